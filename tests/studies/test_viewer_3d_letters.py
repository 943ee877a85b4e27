"""The 3D view's letters in the browser (static/js/viewer/volume3d.js ``viewLetters``, run by
Node as an ES module) are the server's (portal/imaging/render3d.py ``letters``) at every
angle the server renders."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from portal.imaging.render3d import letters

VOLUME3D = Path(__file__).resolve().parents[2] / "static" / "js" / "viewer" / "volume3d.js"

SCRIPT = """
import { viewLetters } from '%s';
const out = {};
for (let a = 0; a < 360; a += 5) {
  for (let e = -90; e <= 90; e += 5) out[`${a},${e}`] = viewLetters(a, e);
}
console.log(JSON.stringify(out));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="Node is not installed")
def test_the_browser_and_the_server_draw_the_same_letters() -> None:
    done = subprocess.run(["node", "--input-type=module", "-e", SCRIPT % VOLUME3D.as_uri()],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    browser = json.loads(done.stdout)
    assert len(browser) == 72 * 37
    for key, shown in browser.items():
        azimuth, elevation = (int(v) for v in key.split(","))
        assert shown == letters(azimuth, elevation), key
