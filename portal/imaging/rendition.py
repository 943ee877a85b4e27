"""Renditions: the allow-listed ways a frame may be turned into a web image.

Anything outside the allow-list is an ``InvalidRendition`` (HTTP 400). The cache key carries
``RENDER_VERSION`` so a change to the pipeline never serves old bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from portal import failures

RENDER_VERSION = 3
WIDTHS = (64, 128, 256, 512, 1024, 2048)
THUMBNAIL_WIDTH = 128
FORMATS: dict[str, str] = {"image/jpeg": "jpeg", "image/png": "png", "image/webp": "webp",
                           "image/*": "jpeg", "*/*": "jpeg"}
MEDIA_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
VOI_FUNCTIONS = ("linear", "linear_exact", "sigmoid")
# Named presets (centre, width) in Hounsfield units for CT; "auto" uses the file's own window
# or, without one, robust percentiles of the pixel values.
PRESETS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40.0, 400.0), "lung": (-600.0, 1500.0), "bone": (300.0, 1500.0),
    "brain": (40.0, 80.0), "abdomen": (60.0, 400.0), "mediastinum": (50.0, 350.0),
}


class InvalidRendition(failures.Invalid, ValueError):
    """A rendering parameter is outside what the portal offers; the message says which."""


@dataclass(frozen=True)
class Window:
    """A VOI window (PS3.3 C.11.2.1.2): centre, width and function."""

    center: float
    width: float
    function: Literal["linear", "linear_exact", "sigmoid"] = "linear"


@dataclass(frozen=True)
class Rendition:
    """One allow-listed rendition: size, format, quality and window."""

    width: int | None = None  # None: the original size
    height: int | None = None  # viewport height bound, from ``viewport=w,h``
    format: Literal["jpeg", "png", "webp"] = "jpeg"
    quality: int = 85
    window: Window | None = None  # None: the file's own or a robust default
    preset: str = "auto"
    # ``viewport=vw,vh`` as asked (PS3.18 8.3.5.1.3): the output is that size exactly.
    viewport: tuple[int, int] | None = None

    @property
    def media_type(self) -> str:
        """The HTTP Content-Type of the encoded image."""
        return MEDIA_TYPES[self.format]

    def cache_key(self, sha256: str, frame: int) -> str:
        """A key naming the content and the rendition, never a person."""
        window = (f"{self.window.center!r},{self.window.width!r},{self.window.function}"
                  if self.window else self.preset)
        raw = (f"v{RENDER_VERSION}:{sha256}:{frame}:{self.width}:{self.height}:{self.format}:"
               f"{self.quality}:{window}" + (f":vp{self.viewport}" if self.viewport else ""))
        return "render:" + hashlib.sha256(raw.encode()).hexdigest()


def _pick_format(accept: str) -> str:
    if not accept.strip():
        return "jpeg"
    for media_range in accept.split(","):
        media = media_range.split(";")[0].strip().lower()
        if media in FORMATS:
            return FORMATS[media]
    raise InvalidRendition("rendered images are available as image/jpeg, image/png or "
                           "image/webp")


def parse_rendition(args: Mapping[str, str], accept: str, *, thumbnail: bool = False
                    ) -> Rendition:
    """Read PS3.18 rendered-resource parameters (window, viewport, quality) and Accept."""
    fmt = _pick_format(accept)
    width: int | None = THUMBNAIL_WIDTH if thumbnail else None
    height: int | None = None
    viewport: tuple[int, int] | None = None
    if "viewport" in args:
        parts = args["viewport"].split(",")
        try:
            numbers = [int(p) for p in parts[:2]]
        except ValueError as exc:
            raise InvalidRendition("viewport is width,height in pixels") from exc
        if len(numbers) != 2 or min(numbers) <= 0 or max(numbers) > 8192 or len(parts) > 2:
            raise InvalidRendition("viewport is width,height in pixels (1 to 8192)")
        # Exactly as asked, not snapped to an allow-listed width (PS3.18 8.3.5.1.3).
        width, height = numbers[0], numbers[1]
        viewport = (width, height)
    if "width" in args:
        try:
            asked = int(args["width"])
        except ValueError as exc:
            raise InvalidRendition("width is a number of pixels") from exc
        if asked not in WIDTHS:
            raise InvalidRendition(f"width must be one of {', '.join(map(str, WIDTHS))}")
        width = asked
    quality = 85
    if "quality" in args:
        try:
            quality = int(args["quality"])
        except ValueError as exc:
            raise InvalidRendition("quality is a number from 1 to 100") from exc
        if not 1 <= quality <= 100:
            raise InvalidRendition("quality is a number from 1 to 100")
    window: Window | None = None
    preset = args.get("preset", "auto")
    if preset != "auto" and preset not in PRESETS:
        raise InvalidRendition(f"preset must be auto or one of {', '.join(PRESETS)}")
    if "window" in args:
        parts = [p.strip() for p in args["window"].split(",")]
        if len(parts) not in (2, 3):
            raise InvalidRendition("window is center,width[,function]")
        try:
            center, span = float(parts[0]), float(parts[1])
        except ValueError as exc:
            raise InvalidRendition("window center and width are numbers") from exc
        # PS3.18 8.3.5.1.4 spells it "linear-exact", PS3.3 C.11.2.1.3 "LINEAR_EXACT".
        function = parts[2].lower().replace("-", "_") if len(parts) == 3 else "linear"
        if function not in VOI_FUNCTIONS:
            raise InvalidRendition("window function must be one of linear, linear-exact, "
                                   "sigmoid")
        if not span > 0 or abs(center) > 1e7 or span > 1e7:
            raise InvalidRendition("window width must be greater than 0")
        window = Window(center, span, function)  # type: ignore[arg-type]
    elif preset != "auto":
        window = Window(*PRESETS[preset])
    return Rendition(width=width, height=height, format=fmt,  # type: ignore[arg-type]
                     quality=quality, window=window, preset=preset, viewport=viewport)
