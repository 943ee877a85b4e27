"""The phone viewer on a slow mobile network: how soon the first image shows, how many bytes
it took, and when every slice of the demo CT scrolls.

Starts a throwaway portal (gunicorn, its documented entry point) and an OIDC provider
(PyPI ``oidc-provider-mock``) on 127.0.0.1, stores the demo CT (150 slices of 512x512,
``demo.studies.write_ct_series``) with STOW-RS, signs a physician in with Debian Chromium under
a phone profile, then throttles the network through CDP (``Network.emulateNetworkConditions``:
1.6 Mbps down, 750 kbps up, 150 ms round trip) and, with an empty browser cache each run,

* opens the study page: time and bytes until the first series preview is painted;
* from the study list (loaded once, so the app shell is in the browser's and the service
  worker's caches, as on a phone that used the portal before), taps the study: time from the
  tap and bytes until the study page paints its first image ("list tap");
* opens the viewer: time and bytes until the first image is painted (a 128-pixel preview
  first, then the image at the screen's size), and the time until every slice has a preview
  ("scrollable") and until every slice is there at full size;
* flicks through the viewer's 150 slices from the first second after opening it, one slice per
  drawn frame, and counts the slices shown per second (issue 17 item 3: >= 20): with the
  series' stack (one PS3.18 rendered-series request, ``tests/studies/test_series_stack.py``)
  and, before it, with per-frame URLs only (the stack's request aborted: what the viewer did
  before, one request per slice).

Times count from the navigation's start (``performance.timeOrigin``); bytes are the transfer
sizes (headers and bodies) of the document and every resource finished by then. Run 1 meets a
cold render cache on the server; later runs find rendered images cached (only the browser
cache is emptied). See benchmarks/README.md.

    .venv/bin/python benchmarks/phone.py [--runs 3] [--device "Pixel 7"] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for _entry in (REPO_ROOT, BENCH_DIR):
    if str(_entry) not in sys.path:
        sys.path.insert(0, str(_entry))

from ingest import (  # noqa: E402
    ProcessGroup,
    Target,
    _parse_client_secret,
    _wait_http_ready,
    log,
    make_series,
    run_main,
    stow_bulk,
)

from tests.browser import chromium, loopback_only, phone  # noqa: E402
from tests.studies.test_series_stack import flick  # noqa: E402
from tests.support.orthanc import free_ports  # noqa: E402

DOWN_BPS = 1_600_000
UP_BPS = 750_000
RTT_MS = 150
PHYSICIAN = "bench-doc"
# Issue 13: from a tap on the list, the study page's first image within 1 s and 40 KB.
GOALS = {"first_image_s": 2.0, "first_image_kb": 250.0, "list_tap_s": 1.0, "list_tap_kb": 40.0}

# Issue 13 item 2: the first sagittal of a stored CT (its volume built after ingest) <= 1 s.
GOALS["first_sagittal_s"] = 1.0
# Issue 17 item 3: slices visible per second while flicking, from the first second.
GOALS["flick_slices_per_s"] = 20.0
STACK_QUERY = "/rendered?width=128&quality=70"  # the viewer's stack (static/js/viewer.js)

# Runs in every page before its own scripts: keep all resource timings, note when the viewer
# first paints a preview and the full-size image, and when the study page shows a preview.
PROBE = """
performance.setResourceTimingBufferSize(5000);
window.__marks = {};
const mark = (name) => { if (!(name in window.__marks)) window.__marks[name] = performance.now(); };
new MutationObserver(() => {
  const v = document.getElementById('viewer');
  if (v) {
    if (v.dataset.quality === 'preview' || v.dataset.quality === 'full') mark('first');
    if (v.dataset.quality === 'full') mark('full');
    if (+v.dataset.loaded && +v.dataset.loaded === JSON.parse(
        document.getElementById('viewer-data').textContent).frames.length) mark('scrollable');
    if (+v.dataset.loadedFull && +v.dataset.loadedFull === JSON.parse(
        document.getElementById('viewer-data').textContent).frames.length) mark('allFull');
    if ((v.dataset.src || '').includes('/volume/sagittal?') && v.dataset.quality === 'full')
      mark('sagittal');
  }
}).observe(document, {subtree: true, attributes: true,
                      attributeFilter: ['data-quality', 'data-loaded', 'data-loaded-full',
                                        'data-src']});
document.addEventListener('load', (e) => {
  if (e.target.matches && e.target.matches('img.thumb')) mark('thumb');
}, true);
"""

BYTES_UNTIL = """(until) => {
  const nav = performance.getEntriesByType('navigation')[0];
  let bytes = nav.transferSize;
  let count = 1;
  for (const r of performance.getEntriesByType('resource')) {
    if (r.responseEnd <= until) { bytes += r.transferSize; count += 1; }
  }
  return {bytes, count};
}"""


def start_idp() -> tuple[Any, str]:
    """The mock OIDC provider in this process, on loopback (issuer http://localhost:PORT)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from oidc_provider_mock import run_server_in_thread

    context = run_server_in_thread(port=0, require_nonce=True)
    server = context.__enter__()
    return context, f"http://localhost:{server.server_port}"


def start_portal(workdir: Path, procs: ProcessGroup, issuer: str) -> tuple[str, dict[str, str]]:
    """gunicorn on 127.0.0.1 with sign-in at the mock provider; returns (base URL, env)."""
    instance = workdir / "portal-instance"
    instance.mkdir(parents=True)
    (port,) = free_ports(1)
    env = dict(os.environ)
    env.update(PORTAL_INSTANCE_PATH=str(instance), PORTAL_SECRET_KEY=secrets.token_urlsafe(32),
               PORTAL_BIND=f"127.0.0.1:{port}", PORTAL_OIDC_ISSUER=issuer,
               PORTAL_OIDC_CLIENT_ID="phone-bench", PORTAL_OIDC_CLIENT_SECRET="phone-bench-secret")
    gunicorn = procs.start([sys.executable, "-m", "gunicorn", "-c", "python:portal.gunicorn_config",
                            "--no-control-socket", "app:app"],
                           env=env, log_path=workdir / "portal-gunicorn.log")
    base = f"http://127.0.0.1:{port}"
    _wait_http_ready(f"{base}/readyz", gunicorn, workdir / "portal-gunicorn.log")
    return base, env


def store_demo_ct(workdir: Path, base: str, env: dict[str, str]) -> tuple[str, str]:
    """STOW-RS the demo CT through a read/store machine client; returns (study, series)."""
    from pydicom import dcmread

    from demo.studies import write_ct_series

    created = subprocess.run([sys.executable, "-m", "flask", "--app", "app", "clients", "create",
                              "phone-bench", "--read"], cwd=REPO_ROOT, env=env,
                             capture_output=True, text=True, timeout=120, check=True)
    target = Target("portal", f"{base}/dicomweb", _parse_client_secret(created.stdout), "", 0,
                    ("stow-bulk",), {}, {})
    series = make_series(write_ct_series, workdir / "ct", slices=150, size=512, seed="ct")
    log(f"storing the demo CT ({len(series.payloads)} slices) ...")
    stow_bulk(target, series)
    header = dcmread(series.files[0], stop_before_pixels=True)
    return str(header.StudyInstanceUID), str(header.SeriesInstanceUID)


def grant_physician(env: dict[str, str], issuer: str, study: str) -> None:
    """Register the physician and grant the study, as an office manager would."""
    from portal import create_app
    from portal.access.grants import create_grant
    from portal.access.models import User
    from portal.access.principal import Principal

    app = create_app({"INSTANCE_PATH": env["PORTAL_INSTANCE_PATH"],
                      "SECRET_KEY": env["PORTAL_SECRET_KEY"], "OIDC_ISSUER": issuer,
                      "OIDC_CLIENT_ID": "phone-bench", "OIDC_CLIENT_SECRET": "x",
                      "RENDER_ISOLATION": False})
    admin = Principal("user", 0, "benchmark", roles=frozenset({"office_manager"}),
                      issuer="benchmark", subject="benchmark")
    with app.extensions["db"].write_transaction() as session:
        user = User(issuer=issuer, subject=PHYSICIAN, email=f"{PHYSICIAN}@demo.example",
                    display_name="Dr Bench", roles=["physician"], active=True, security_epoch=0)
        session.add(user)
        session.flush()
        create_grant(session, admin, user_id=user.id, study_uid=study)
    app.extensions["db"].dispose()


def clear_caches(cdp: Any, base: str) -> None:
    """An empty browser cache and an empty service-worker cache (the worker stays)."""
    cdp.send("Network.clearBrowserCache")
    cdp.send("Storage.clearDataForOrigin", {"origin": base, "storageTypes": "cache_storage"})


def measure_list_tap(page: Any, base: str, study: str) -> dict[str, Any]:
    """The study list is on screen; a tap on the study until its page paints an image."""
    page.goto(f"{base}/studies", wait_until="load")
    row = page.locator(f'a.study[href="/studies/{study}"]')
    row.wait_for()
    tapped = page.evaluate("Date.now()")
    row.tap()
    page.wait_for_url(f"{base}/studies/{study}")
    page.wait_for_function("() => 'thumb' in window.__marks", timeout=120_000)
    thumb = page.evaluate("window.__marks.thumb")
    shown = page.evaluate("performance.timeOrigin + window.__marks.thumb")
    bytes_until = page.evaluate(BYTES_UNTIL, thumb)
    return {"list_tap_s": (shown - tapped) / 1000, "list_tap_bytes": bytes_until["bytes"],
            "list_tap_requests": bytes_until["count"]}


def wait_for_volume(workdir: Path, timeout: float = 300.0) -> float:
    """Wait until the after-ingest build has written the CT's volume file; seconds waited."""
    folder = workdir / "portal-instance" / "volumes"
    started = time.monotonic()
    while not any(folder.glob("*.npz")):
        if time.monotonic() - started > timeout:
            raise RuntimeError("the stored CT's volume was not built after ingest")
        time.sleep(0.2)
    return time.monotonic() - started


def measure_first_sagittal(page: Any) -> dict[str, Any]:
    """On the viewer: choose Sagittal (as the view menu does) and time until the sagittal
    image is drawn at full quality, including the volume check and the image's transfer."""
    page.evaluate("""() => {
      const views = document.querySelector('select[name=view]');
      window.__marks.sagittalAsked = performance.now();
      views.value = 'sagittal';
      views.dispatchEvent(new Event('change'));
    }""")
    page.wait_for_function("() => 'sagittal' in window.__marks", timeout=120_000)
    marks = page.evaluate("window.__marks")
    return {"first_sagittal_s": (marks["sagittal"] - marks["sagittalAsked"]) / 1000}


def is_stack(url: str) -> bool:
    """Whether ``url`` is the viewer's request for a series' stack."""
    return url.endswith(STACK_QUERY)


def measure_flick(page: Any, cdp: Any, base: str, study: str, series: str) -> dict[str, Any]:
    """Flick through the viewer from its first second: with the stack, then per frame."""
    viewer = f"{base}/studies/{study}/view/{series}"
    clear_caches(cdp, base)
    after = flick(page, viewer)
    clear_caches(cdp, base)
    page.route(is_stack, lambda route: route.abort())
    try:
        before = flick(page, viewer)
    finally:
        page.unroute(is_stack)
    return {"flick_slices_per_s": after["per_second"],
            "flick_from_stack_first_byte_per_s": after.get("per_second_from_stack", 0.0),
            "flick_stack_first_byte_s": after.get("stack_first_byte_s", 0.0),
            "flick_per_frame_urls_per_s": before["per_second"]}


def measure_run(page: Any, cdp: Any, base: str, study: str, series: str) -> dict[str, Any]:
    """One cold-cache run of the study page and of the viewer, then a tap from the list."""
    clear_caches(cdp, base)
    page.goto(f"{base}/studies/{study}", wait_until="commit")
    page.wait_for_function("() => 'thumb' in window.__marks", timeout=120_000)
    thumb = page.evaluate("window.__marks.thumb")
    study_bytes = page.evaluate(BYTES_UNTIL, thumb)
    clear_caches(cdp, base)
    page.goto(f"{base}/studies/{study}/view/{series}", wait_until="commit")
    page.wait_for_function("() => 'full' in window.__marks", timeout=120_000)
    marks = page.evaluate("window.__marks")
    first_bytes = page.evaluate(BYTES_UNTIL, marks["first"])
    full_bytes = page.evaluate(BYTES_UNTIL, marks["full"])
    page.wait_for_function("() => 'scrollable' in window.__marks", timeout=600_000)
    page.wait_for_function("() => 'allFull' in window.__marks", timeout=900_000)
    marks = page.evaluate("window.__marks")
    total = page.evaluate(BYTES_UNTIL, marks["allFull"])
    sagittal = measure_first_sagittal(page)
    tap = measure_list_tap(page, base, study)
    flicked = measure_flick(page, cdp, base, study, series)
    return {**tap, **sagittal, **flicked,
        "study_page_first_preview_s": thumb / 1000, "study_page_bytes": study_bytes["bytes"],
        "first_image_s": marks["first"] / 1000, "first_image_bytes": first_bytes["bytes"],
        "first_image_requests": first_bytes["count"],
        "full_size_image_s": marks["full"] / 1000, "full_size_image_bytes": full_bytes["bytes"],
        "all_slices_scrollable_s": marks["scrollable"] / 1000,
        "all_slices_full_size_s": marks["allFull"] / 1000, "all_slices_bytes": total["bytes"],
    }


def run_benchmark(args: argparse.Namespace, workdir: Path, procs: ProcessGroup) -> dict[str, Any]:
    """Start everything, sign in, measure ``args.runs`` times."""
    idp_context, issuer = start_idp()
    procs.adopt(lambda: idp_context.__exit__(None, None, None))
    base, env = start_portal(workdir, procs, issuer)
    study, series = store_demo_ct(workdir, base, env)
    grant_physician(env, issuer, study)
    log(f"volume built after ingest ({wait_for_volume(workdir):.1f} s after the STOW-RS)")
    runs: list[dict[str, Any]] = []
    failures: list[str] = []
    with chromium() as (playwright, browser):
        # --no-service-worker: what a browser without the app shell's worker gets.
        context = browser.new_context(**phone(playwright, args.device), service_workers=(
            "block" if args.no_service_worker else "allow"))
        loopback_only(context)
        context.add_init_script(PROBE)
        page = context.new_page()
        page.goto(f"{base}/auth/login?next=/studies")
        page.fill("input[name=sub]", PHYSICIAN)
        page.get_by_role("button", name="Authorize").click()
        page.wait_for_url(f"{base}/studies")
        cdp = context.new_cdp_session(page)
        cdp.send("Network.enable")
        cdp.send("Network.emulateNetworkConditions", {
            "offline": False, "latency": RTT_MS, "downloadThroughput": DOWN_BPS / 8,
            "uploadThroughput": UP_BPS / 8, "connectionType": "cellular4g"})
        for number in range(1, args.runs + 1):
            log(f"run {number} of {args.runs} ...")
            try:
                runs.append(measure_run(page, cdp, base, study, series))
                log(f"  {runs[-1]}")
            except Exception as exc:  # a failed run is reported, the others still run
                failures.append(f"run {number}: {exc}")
        context.close()
    return {"device": args.device, "service_worker": not args.no_service_worker,
            "network": {"down_bps": DOWN_BPS, "up_bps": UP_BPS, "rtt_ms": RTT_MS},
            "runs": runs, "failures": failures, "goals": GOALS}


def format_table(result: dict[str, Any]) -> str:
    """Run 1 (cold server cache) and the median of the later runs."""
    runs = result["runs"]
    if not runs:
        return "no successful run: " + "; ".join(result["failures"])
    later = runs[1:] or runs
    rows = [("list tap: study page's first image", "list_tap_s", "s"),
            ("list tap: bytes until then", "list_tap_bytes", "KB"),
            ("study page (cold): first series preview", "study_page_first_preview_s", "s"),
            ("study page: bytes until then", "study_page_bytes", "KB"),
            ("viewer: first image painted (preview)", "first_image_s", "s"),
            ("viewer: bytes until then", "first_image_bytes", "KB"),
            ("viewer: first full-size image", "full_size_image_s", "s"),
            ("viewer: bytes until then", "full_size_image_bytes", "KB"),
            ("all 150 slices scrollable (preview)", "all_slices_scrollable_s", "s"),
            ("all 150 slices at full size", "all_slices_full_size_s", "s"),
            ("bytes for all slices at full size", "all_slices_bytes", "KB"),
            ("first sagittal (stored CT)", "first_sagittal_s", "s"),
            ("flick: slices shown / s, per-frame URLs", "flick_per_frame_urls_per_s", "/s"),
            ("flick: slices shown / s, series stack", "flick_slices_per_s", "/s"),
            ("  the same from the stack's first byte", "flick_from_stack_first_byte_per_s",
             "/s"),
            ("  the stack's first byte", "flick_stack_first_byte_s", "s")]
    lines = [f"{result['device']}, 1.6 Mbps down / 750 kbps up / 150 ms RTT, empty browser "
             "cache each run (but for the list tap)"
             + ("" if result.get("service_worker", True) else ", service worker blocked"),
             f"{'':40} {'run 1 (cold server)':>20} {'later runs (median)':>20}"]
    for label, key, unit in rows:
        def show(value: float, unit: str = unit) -> str:
            if unit == "/s":
                return f"{value:.1f} / s"
            return f"{value / 1024:.0f} KB" if unit == "KB" else f"{value:.2f} s"

        lines.append(f"{label:40} {show(runs[0][key]):>20} "
                     f"{show(statistics.median(r[key] for r in later)):>20}")
    first = statistics.median(r["first_image_s"] for r in later)
    kb = statistics.median(r["first_image_bytes"] for r in later) / 1024
    met = ("met" if first <= GOALS["first_image_s"] else "MISSED",
           "met" if kb <= GOALS["first_image_kb"] else "MISSED")
    lines.append(f"goals (later runs): first image <= {GOALS['first_image_s']} s ({met[0]}), "
                 f"<= {GOALS['first_image_kb']:.0f} KB before it ({met[1]})")
    tap_s = statistics.median(r["list_tap_s"] for r in later)
    tap_kb = statistics.median(r["list_tap_bytes"] for r in later) / 1024
    lines.append(f"goals (later runs): list tap to first image <= {GOALS['list_tap_s']} s "
                 f"({'met' if tap_s <= GOALS['list_tap_s'] else 'MISSED'}), "
                 f"<= {GOALS['list_tap_kb']:.0f} KB before it "
                 f"({'met' if tap_kb <= GOALS['list_tap_kb'] else 'MISSED'})")
    flicked = statistics.median(r["flick_slices_per_s"] for r in later)
    lines.append(f"goal (later runs): flicking from the first second >= "
                 f"{GOALS['flick_slices_per_s']:.0f} slices / s "
                 f"({'met' if flicked >= GOALS['flick_slices_per_s'] else 'MISSED'})")
    sagittal = runs[0]["first_sagittal_s"]  # run 1: no reformat rendered before it
    lines.append(f"goal (run 1): first sagittal of a stored CT <= {GOALS['first_sagittal_s']} s "
                 f"({'met' if sagittal <= GOALS['first_sagittal_s'] else 'MISSED'})")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="Pixel 7", help="a Playwright device profile")
    parser.add_argument("--json", type=Path, help="also write the result as JSON here")
    parser.add_argument("--no-service-worker", action="store_true",
                        help="block the app shell's service worker (HTTP cache only)")
    parser.add_argument("--workdir", type=Path, help="keep logs and server state here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    started = time.monotonic()
    status = run_main(parse_args(argv), run_benchmark, format_table)
    log(f"done in {time.monotonic() - started:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
