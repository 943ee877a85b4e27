"""Static files for slow phone networks: content-hashed URLs cached for a year, compressed text
answers, and the service worker's header.

``url_for('static', filename=...)`` adds ``?v=<hash of the file's bytes>``; an answer to such a
URL is ``immutable`` for a year (a changed file gets a new URL), any other static answer is
revalidated. ES modules import each other by plain relative URLs, so an import map (in the
layout) points those URLs at the hashed ones.

Compression (flask-compress: zstd, br, gzip) covers text types only (HTML, CSS, JS, JSON,
SVG), never images, DICOM or ZIPs, which are compressed already or must stay byte-exact.
BREACH (a secret such as the CSRF token guessed from compressed sizes) needs the attacker's
input reflected in the same compressed answer; so HTML is compressed only for GET requests
without a query string (nothing typed is echoed there), and no answer to a POST is.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from flask import Flask, Response, request, url_for
from flask_compress import Compress
from markupsafe import Markup

YEAR = 31_536_000
IMMUTABLE = f"public, max-age={YEAR}, immutable"
SERVICE_WORKER = "sw.js"
# Text types worth compressing; everything else (images, DICOM, ZIP, PDF) is left alone.
TEXT_TYPES = ["text/html", "text/css", "text/plain", "text/javascript", "application/javascript",
              "application/json", "application/manifest+json", "image/svg+xml"]


class Fingerprints:
    """Content hashes of static files, recomputed when a file's size or time changes."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder.resolve()
        self._known: dict[str, tuple[tuple[int, int], str]] = {}

    def of(self, filename: str) -> str | None:
        """The first 12 hex digits of the file's SHA-256, or None when it is not a file here."""
        path = (self.folder / filename).resolve()
        if not path.is_relative_to(self.folder) or not path.is_file():
            return None
        stat = path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        known = self._known.get(filename)
        if known is None or known[0] != stamp:
            known = (stamp, hashlib.sha256(path.read_bytes()).hexdigest()[:12])
            self._known[filename] = known
        return known[1]

    def modules(self) -> list[str]:
        """Every JavaScript file under static/js, as filenames relative to static/."""
        return sorted(p.relative_to(self.folder).as_posix()
                      for p in (self.folder / "js").rglob("*.js"))


def import_map() -> Markup:
    """The import map's JSON: plain module URLs to their hashed URLs (for relative imports)."""
    from flask import current_app

    prints: Fingerprints = current_app.extensions["fingerprints"]
    imports = {url_for("static", filename=name, v=None): url_for("static", filename=name)
               for name in prints.modules()}
    # Our own URLs as JSON, escaped for a <script> element: no '</' can end it early.
    return Markup(json.dumps({"imports": imports}).replace("</", "<\\/"))  # noqa: S704


def _compressible(response: Response) -> bool:
    """Text answers to GETs; HTML only when the request echoes nothing typed (BREACH)."""
    if request.method not in ("GET", "HEAD"):
        return False
    return not (response.mimetype == "text/html" and request.query_string)


def init_app(app: Flask) -> None:
    """Hashed static URLs with their cache headers, compression, the service worker's scope."""
    assert app.static_folder is not None
    prints = Fingerprints(Path(app.static_folder))
    app.extensions["fingerprints"] = prints
    app.jinja_env.globals["asset_import_map"] = import_map

    @app.url_defaults
    def _fingerprint(endpoint: str, values: dict[str, Any]) -> None:
        if endpoint != "static":
            return
        if "v" in values:
            if values["v"] is None:  # v=None asks for the plain URL (the import map's keys)
                del values["v"]
            return
        filename = str(values.get("filename", ""))
        # The service worker keeps one URL: a browser updates it by fetching that URL again.
        digest = prints.of(filename) if filename != SERVICE_WORKER else None
        if digest:
            values["v"] = digest

    app.config.update(COMPRESS_MIMETYPES=TEXT_TYPES, COMPRESS_REGISTER=False,
                      COMPRESS_ALGORITHM=["zstd", "br", "gzip"],
                      COMPRESS_ALGORITHM_STREAMING=["zstd", "br", "gzip"])
    compress = Compress()
    compress.init_app(app)

    @app.after_request
    def _static_and_compress(response: Response) -> Response:
        if request.endpoint == "static" and response.status_code in (200, 304):
            filename = (request.view_args or {}).get("filename", "")
            wanted = request.args.get("v")
            if filename == SERVICE_WORKER:
                # Served under /static/ but controls the whole site; always checked for news.
                response.headers["Service-Worker-Allowed"] = "/"
                response.headers["Cache-Control"] = "no-cache"
            elif wanted and wanted == prints.of(filename):
                response.headers["Cache-Control"] = IMMUTABLE
            else:
                response.headers["Cache-Control"] = "no-cache"
        if _compressible(response):
            return compress.after_request(response)
        return response
