"""The viewer's pure helpers (static/js/viewer/geometry.js), run by Node as an ES module."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

GEOMETRY = Path(__file__).resolve().parents[2] / "static" / "js" / "viewer" / "geometry.js"

SCRIPT = """
import assert from 'node:assert/strict';
import { directionLetters, lengthMm, markers, pickWidth, windowMap } from '%s';
const axial = [1, 0, 0, 0, 1, 0];
const m4 = (top, right, bottom, left) => ({top, right, bottom, left});
const widths = [64, 128, 256, 512, 1024, 2048];
// The screen asks for device pixels; never more than the image has; round down within 20 %%.
assert.equal(pickWidth(1170, 512, widths), 512);
assert.equal(pickWidth(1170, 1841, widths), 1024);
assert.equal(pickWidth(2732, 3000, widths), 2048);
assert.equal(pickWidth(300, 512, widths), 256);
// Patient directions (LPS): +x is the patient's left, +y posterior, +z head.
assert.equal(directionLetters([1, 0, 0]), 'L');
assert.equal(directionLetters([0, -1, 0]), 'A');
assert.equal(directionLetters([0.8, 0, -0.6]), 'LF');
assert.deepEqual(markers(axial, 'stack'), m4('A', 'L', 'P', 'R'));
assert.deepEqual(markers(axial, 'coronal'), m4('H', 'L', 'F', 'R'));
assert.deepEqual(markers(axial, 'sagittal'), m4('H', 'P', 'F', 'A'));
assert.deepEqual(markers(axial, 'mip', 180), m4('H', 'R', 'F', 'L'));
assert.deepEqual(markers(null, 'stack'), m4('', '', '', ''));
// Re-windowing rendered pixels: the same window is the identity; the map is exact inside.
const soft = {center: 40, width: 400};
assert.deepEqual(windowMap(soft, soft, false), {slope: 1, intercept: 0});
const m = windowMap({center: 40, width: 400}, {center: 140, width: 200}, false);
const shown = (hu, c, w) => (hu - (c - w / 2)) / w;
for (const hu of [50, 100, 200]) {
  assert.ok(Math.abs(m.slope * shown(hu, 40, 400) + m.intercept - shown(hu, 140, 200)) < 1e-9);
}
const inv = windowMap({center: 40, width: 400}, {center: 40, width: 400}, true);
assert.deepEqual(inv, {slope: -1, intercept: 1});
// Lengths: x across spans the field width, y down its height.
assert.equal(lengthMm({x: 0, y: 0}, {x: 0.5, y: 0}, {across: 400, down: 400}), 200);
assert.equal(lengthMm({x: 0, y: 0}, {x: 0.3, y: 0.4}, {across: 100, down: 100}), 50);
assert.equal(lengthMm({x: 0, y: 0}, {x: 1, y: 0}, null), null);
console.log('ok');
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="Node is not installed")
def test_geometry_helpers() -> None:
    done = subprocess.run(["node", "--input-type=module", "-e", SCRIPT % GEOMETRY.as_uri()],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
