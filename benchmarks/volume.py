"""3D views and MIPs: latency per turned view and the memory of a render process.

Writes a synthetic CT series (default 150 slices of 512x512, demo.studies), builds its volume
once into a volume folder (as after ingest; reduced to 256 wide), then asks a real render
pool (isolated, memory-capped processes: portal/imaging/isolation.py) for turned views, each
at a new angle so nothing is cached:

* 3D styles bone, vessels, soft tissue and skin at ``detail=low`` (while a finger turns the
  view) and ``full`` (on release), 512 px JPEG;
* the oblique MIP (two angles) low and full, and with a 20 mm slab;
* the azimuth-only MIP of the viewer's "3D MIP" view;

and reports the median and 90th percentile of the wall time per view, the render process's
CPU time per view (what an idle core would take: the renderer uses one), the render
processes' peak resident memory (VmHWM) and the load average (the machine is shared).
See benchmarks/README.md "3D views".

    .venv/bin/python benchmarks/volume.py [--slices 150] [--size 512] [--turns 12]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from demo.studies import write_ct_series  # noqa: E402
from portal.archive.store import StoredFile  # noqa: E402
from portal.imaging.isolation import (  # noqa: E402
    RenderPool,
    prepare_volume,
    render_turned_source,
    render_volume_source,
)
from portal.imaging.render3d import Turn  # noqa: E402
from portal.imaging.rendition import Rendition  # noqa: E402
from portal.imaging.volume import content_key  # noqa: E402
from portal.imaging.volume_files import VolumeFiles  # noqa: E402


def _vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_seconds(pids: list[int]) -> float:
    """User and system CPU time of these processes so far (independent of the machine's
    load, unlike wall time: the renderer is single-threaded)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=150)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--turns", type=int, default=12, help="angles timed per view")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        paths = write_ct_series(Path(scratch) / "ct", slices=args.slices, size=args.size,
                                uid_seed="bench-volume")
        # Stored files (a path and a digest), as the portal hands them: a render process reads
        # them itself; nothing but names goes through the pipe.
        sources = [StoredFile(str(p), hashlib.sha256(p.read_bytes()).hexdigest())
                   for p in paths]
        key = content_key(s.sha256 for s in sources)
        files = VolumeFiles(Path(scratch) / "volumes")
        # As in the portal: two render processes, 2 GiB address space each, frame cache on.
        pool = RenderPool(workers=2, memory_bytes=2 << 30, timeout_seconds=60,
                          frame_cache_bytes=256 << 20)
        pool.start()
        try:
            started = time.perf_counter()
            pool.run(prepare_volume, key, sources, files)
            build = time.perf_counter() - started
            rendition = Rendition(width=512, format="jpeg")
            views: list[tuple[str, dict[str, object] | None]] = [
                (f"3D {style} {detail}", {"preset": style, "quality": detail})
                for style in ("bone", "vessels", "soft", "skin") for detail in ("low", "full")]
            views += [
                ("MIP oblique low", {"preset": None, "quality": "low"}),
                ("MIP oblique full", {"preset": None, "quality": "full"}),
                ("MIP oblique 20 mm slab full", {"preset": None, "quality": "full",
                                                 "slab_mm": 20.0}),
                ("MIP azimuth only (3D MIP view)", None),
            ]
            results: dict[str, dict[str, float]] = {}
            pids = [p.pid for p in pool.processes() if p.pid]
            for name, options in views:
                times = []
                cpu_before = _cpu_seconds(pids)
                for turn in range(args.turns):
                    azimuth = float((35 + 25 * turn) % 360 // 5 * 5)
                    elevation = float((turn * 15) % 90 - 40) // 5 * 5
                    started = time.perf_counter()
                    if options is None:
                        pool.run(render_volume_source, key, sources, "mip", 0.5, azimuth,
                                 rendition, files)
                    else:
                        pool.run(render_turned_source, key, sources,
                                 Turn(azimuth, elevation, **options),  # type: ignore[arg-type]
                                 rendition, files)
                    times.append((time.perf_counter() - started) * 1000)
                cpu_ms = (_cpu_seconds(pids) - cpu_before) * 1000 / args.turns
                ordered = sorted(times)
                results[name] = {"median_ms": round(statistics.median(times), 1),
                                 "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))], 1),
                                 "cpu_ms": round(cpu_ms, 1)}
                print(f"{name:34s} median {results[name]['median_ms']:7.1f} ms"
                      f"   p90 {results[name]['p90_ms']:7.1f} ms"
                      f"   CPU {cpu_ms:7.1f} ms per view", flush=True)
            peaks = [_vm_hwm_mb(p.pid) for p in pool.processes() if p.pid]
        finally:
            pool.close()
    load = os.getloadavg()
    print(f"volume built in {build:.1f} s; render processes' VmHWM "
          f"{', '.join(f'{m:.0f} MB' for m in peaks)}; load average {load[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps({"views": results, "vm_hwm_mb": peaks,
                                         "build_s": build, "load": load}, indent=2))


if __name__ == "__main__":
    main()
