"""3D views of a built volume, turned about two axes: volume rendering and an oblique MIP.

The camera lives in the patient's coordinate system (LPS, PS3.3 C.7.6.2.1.1: +x the
patient's left, +y posterior, +z head), not in the volume's index space, so what a view
shows and the letters drawn at its edges depend only on the two angles, whatever the
acquisition's orientation:

- azimuth 0, elevation 0 looks at the patient's front (anterior view, as a coronal image):
  the patient's right on the left of the image, the head at the top;
- azimuth turns the camera about the patient's vertical axis towards his left (90: seen from
  his left side, anterior on the left of the image);
- elevation tilts the camera over the head (90: seen from above, posterior at the top).

Rendering is numpy and SciPy on the CPU (the choice and its numbers: benchmarks/README.md
"3D views"): for each block of image rows the volume is resampled along the rays with one
trilinear ``affine_transform``, classified through the preset's opacity and colour tables,
lit by a headlight from the local gradient, and composited front to back; the MIP keeps the
brightest sample of each ray within the slab. A ``quality`` of "low" (while a finger turns
the view) uses a volume halved in each direction and fewer rows, then scales the image up.
Pure functions, no Flask: it runs in the isolated render processes (docs/security.md 32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from portal import failures
from portal.imaging.render import encode, window_to_8bit
from portal.imaging.rendition import Rendition, Window

PRESETS = ("bone", "vessels", "soft", "skin")
QUALITIES = ("low", "full")
MAX_ZOOM = 4.0
_LETTERS = (("R", "L"), ("A", "P"), ("F", "H"))


class BadView(failures.Invalid, ValueError):
    """A 3D view asked for with angles, preset or slab out of range; the message says why."""


@dataclass(frozen=True)
class Camera:
    """Where the image's axes point in the patient (LPS unit vectors)."""

    right: np.ndarray  # across the image, left to right
    up: np.ndarray  # up the image
    forward: np.ndarray  # along the rays, away from the viewer


def camera(azimuth: float, elevation: float) -> Camera:
    """The camera of a view turned by ``azimuth`` and ``elevation`` (degrees)."""
    a, e = math.radians(azimuth), math.radians(elevation)
    right = np.array([math.cos(a), math.sin(a), 0.0])
    ahead = np.array([-math.sin(a), math.cos(a), 0.0])  # horizontal viewing direction
    vertical = np.array([0.0, 0.0, 1.0])
    forward = math.cos(e) * ahead - math.sin(e) * vertical
    up = math.sin(e) * ahead + math.cos(e) * vertical
    return Camera(right, up, forward)


def direction_letters(v: np.ndarray) -> str:
    """Patient direction letters of a direction, strongest first (PS3.3 C.7.6.1.1.1), the
    same rule as static/js/viewer/geometry.js ``directionLetters``."""
    parts = sorted((i for i in range(3) if abs(v[i]) > 0.25), key=lambda i: -abs(v[i]))
    return "".join(_LETTERS[i][1 if v[i] > 0 else 0] for i in parts[:2])


def letters(azimuth: float, elevation: float) -> dict[str, str]:
    """The orientation letters at the image's edges (top, right, bottom, left) for a view;
    static/js/viewer/volume3d.js ``viewLetters`` computes the same."""
    cam = camera(azimuth, elevation)
    return {"top": direction_letters(cam.up), "right": direction_letters(cam.right),
            "bottom": direction_letters(-cam.up), "left": direction_letters(-cam.right)}


# -- transfer functions -------------------------------------------------------------------

@dataclass(frozen=True)
class TransferFunction:
    """Opacity (per millimetre of ray) and colour ramps, piecewise linear in the value."""

    opacity: tuple[tuple[float, float], ...]
    colour: tuple[tuple[float, tuple[float, float, float]], ...]


# CT ramps in Hounsfield units.
_CT: dict[str, TransferFunction] = {
    "bone": TransferFunction(
        ((120.0, 0.0), (250.0, 0.12), (500.0, 0.5), (1200.0, 0.85)),
        ((120.0, (0.62, 0.3, 0.2)), (300.0, (0.92, 0.82, 0.66)), (900.0, (1.0, 0.98, 0.92)))),
    "vessels": TransferFunction(
        ((110.0, 0.0), (170.0, 0.15), (280.0, 0.6), (600.0, 0.8)),
        ((110.0, (0.55, 0.05, 0.04)), (250.0, (0.95, 0.3, 0.22)), (500.0, (1.0, 0.92, 0.86)))),
    "soft": TransferFunction(
        ((-250.0, 0.0), (-80.0, 0.02), (20.0, 0.05), (80.0, 0.14), (250.0, 0.5)),
        ((-120.0, (0.86, 0.72, 0.45)), (30.0, (0.82, 0.38, 0.32)), (250.0, (1.0, 0.95, 0.9)))),
    "skin": TransferFunction(
        ((-650.0, 0.0), (-450.0, 0.25), (-250.0, 0.85)),
        ((-600.0, (0.82, 0.6, 0.48)), (0.0, (0.96, 0.8, 0.68)), (300.0, (1.0, 0.9, 0.82)))),
}
# Other modalities (MR): ramps in the share of the series' window, 0 its bottom, 1 its top.
_RELATIVE: dict[str, TransferFunction] = {
    "bone": TransferFunction(((0.55, 0.0), (0.8, 0.4), (1.0, 0.85)),
                             ((0.55, (0.92, 0.82, 0.66)), (1.0, (1.0, 0.98, 0.92)))),
    "vessels": TransferFunction(((0.6, 0.0), (0.8, 0.5), (1.0, 0.85)),
                                ((0.6, (0.7, 0.08, 0.05)), (1.0, (1.0, 0.6, 0.5)))),
    "soft": TransferFunction(((0.1, 0.0), (0.4, 0.05), (0.8, 0.25), (1.0, 0.5)),
                             ((0.1, (0.86, 0.6, 0.45)), (1.0, (1.0, 0.92, 0.88)))),
    "skin": TransferFunction(((0.04, 0.0), (0.12, 0.6), (0.3, 0.85)),
                             ((0.04, (0.82, 0.6, 0.48)), (0.5, (0.96, 0.8, 0.68)))),
}
_TABLE = 2048  # entries of a classification table


def _table(tf: TransferFunction, low: float, high: float, step_mm: float
           ) -> tuple[np.ndarray, np.ndarray]:
    """Opacity per sample (corrected for the step) and colour, tabulated over low..high."""
    values = np.linspace(low, high, _TABLE)
    xs, alphas = zip(*tf.opacity, strict=True)
    per_mm = np.clip(np.interp(values, xs, alphas), 0.0, 0.999)
    alpha = 1.0 - np.power(1.0 - per_mm, step_mm)
    cx = [point[0] for point in tf.colour]
    rgb = np.stack([np.interp(values, cx, [point[1][k] for point in tf.colour])
                    for k in range(3)], axis=1)
    return alpha.astype(np.float32), rgb.astype(np.float32)


def _ramps(preset: str, is_ct: bool, window: Window | None, voxels: np.ndarray
           ) -> tuple[TransferFunction, float, float]:
    """The preset's ramps and the value range they are tabulated over."""
    if is_ct:
        tf = _CT[preset]
    else:
        relative = _RELATIVE[preset]
        if window is None:
            lo, hi = (float(v) for v in np.percentile(voxels[::2, ::4, ::4], [1.0, 99.5]))
        else:
            lo, hi = window.center - window.width / 2.0, window.center + window.width / 2.0
        span = max(hi - lo, 1e-3)
        tf = TransferFunction(tuple((lo + t * span, a) for t, a in relative.opacity),
                              tuple((lo + t * span, c) for t, c in relative.colour))
    first, last = tf.opacity[0][0], tf.opacity[-1][0]
    margin = (last - first) * 0.5
    return tf, first - 1e-3, last + margin


# -- geometry of the rays ---------------------------------------------------------------------

@dataclass(frozen=True)
class Grid:
    """Voxels and where their axes (slice, row, column) point in the patient, in mm."""

    voxels: np.ndarray
    axes: np.ndarray  # 3x3: column k is the step in mm of index axis k, in LPS


def grid(voxels: np.ndarray, slice_spacing: float, row_spacing: float, column_spacing: float,
         orientation: tuple[float, ...] | None) -> Grid:
    """The geometry of stacked slices: ``orientation`` is Image Orientation (Patient) (the
    row direction, then the column direction); slices go along their normal (as
    ``volume.build_volume`` stacks them); None means axial slices."""
    o = np.array(orientation if orientation else (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), float)
    along_row, down_column = o[:3], o[3:]
    normal = np.cross(along_row, down_column)
    axes = np.stack([normal * slice_spacing, down_column * row_spacing,
                     along_row * column_spacing], axis=1)
    return Grid(voxels, axes)


def halved(g: Grid) -> Grid:
    """The same volume at half the resolution in each direction (2x2x2 means)."""
    v = g.voxels
    d, r, c = (n // 2 * 2 for n in v.shape)
    if min(d, r, c) < 2:
        return g
    v = v[:d, :r, :c]
    small = (v[0::2] + v[1::2]) * 0.5
    small = (small[:, 0::2] + small[:, 1::2]) * 0.5
    small = (small[:, :, 0::2] + small[:, :, 1::2]) * 0.5
    return Grid(np.ascontiguousarray(small, np.float32), g.axes * 2.0)


@dataclass(frozen=True)
class Slices:
    """How the image's pixels meet the volume's slices along the axis the rays cross most
    squarely: slice ``k`` of that axis is drawn on the image by a 2D affine map."""

    axis: int  # the volume's index axis the slices are taken across
    order: range  # slice numbers, nearest the viewer first
    to_slice: np.ndarray  # 2x3: image (x, y, 1) -> slice (column, row) at slice 0
    per_slice: np.ndarray  # how that map's offset moves per slice number
    depth: np.ndarray  # 3: depth in mm (from the centre plane) = depth @ (x, y, k)
    step_mm: float  # the distance between slices along a ray
    size: int
    pixel_mm: float
    forward: np.ndarray  # the viewing direction in index units per mm (B @ forward)


def slices(g: Grid, cam: Camera, size: int, zoom: float = 1.0) -> Slices:
    """The image spans the volume's diagonal (nothing is cut off at any angle) divided by
    ``zoom``, centred on the volume's centre."""
    shape = np.array(g.voxels.shape, float)
    extent = np.abs(g.axes) @ (shape - 1.0)  # box sides in LPS, mm
    pixel_mm = float(np.linalg.norm(extent)) / zoom / size
    to_index = np.linalg.inv(g.axes)  # mm in LPS -> index steps
    u = to_index @ cam.right * pixel_mm  # index change per image column
    w = to_index @ -cam.up * pixel_mm  # per image row
    f = to_index @ cam.forward  # per mm along the ray
    lengths = np.linalg.norm(g.axes, axis=0)
    axis = int(np.argmax(np.abs(f) * lengths))
    centre = (shape - 1.0) / 2.0
    middle = (size - 1) / 2.0
    # idx(x, y, t) = centre + (x - m) u + (y - m) w + t f; on slice k, t = (k - idx_a(t=0)) / f_a.
    base = centre - middle * (u + w)  # idx at x = y = t = 0
    coefficient = np.stack([u, w, base], axis=1)  # 3x3: (x, y, 1) -> idx at t = 0
    fa = f[axis]
    # t = (k - coefficient[axis] @ (x, y, 1)) / fa; substitute into the other two axes.
    others = [i for i in range(3) if i != axis]
    rows = []
    for i in others:
        rows.append(coefficient[i] - f[i] / fa * coefficient[axis])
    along = np.array([f[i] / fa for i in others])
    to_slice = np.stack(rows)  # (first other axis, second other axis)
    depth = np.array([-coefficient[axis][0] / fa, -coefficient[axis][1] / fa, 1.0 / fa])
    depth_offset = -coefficient[axis][2] / fa
    count = g.voxels.shape[axis]
    order = range(count) if fa > 0 else range(count - 1, -1, -1)
    # PIL maps an output pixel's centre (x + 0.5, y + 0.5) and samples at input - 0.5.
    pil = np.array([to_slice[1], to_slice[0]])  # PIL wants (column, row) = (second, first)
    pil_along = np.array([along[1], along[0]])
    pil[:, 2] += 0.5 - 0.5 * (pil[:, 0] + pil[:, 1])
    return Slices(axis, order, pil, pil_along, np.append(depth, depth_offset),
                  float(1.0 / abs(fa)), size, pixel_mm, f)


def _slice(g: Grid, axis: int, k: int) -> np.ndarray:
    return np.ascontiguousarray(np.take(g.voxels, k, axis=axis))


Box = tuple[int, int, int, int]  # rows top..bottom, columns left..right of the image


def _draw(plane: np.ndarray, s: Slices, k: int, fill: float) -> tuple[np.ndarray, Box]:
    """Slice ``k``'s values where they fall on the image (bilinear), drawn only within the
    box its corners project to (a turned slice covers part of the image's square)."""
    m = s.to_slice.copy()
    m[:, 2] += s.per_slice * k
    rows, columns = plane.shape
    corners = np.array([[0, 0], [columns, 0], [0, rows], [columns, rows]], float)
    # image (x + 0.5, y + 0.5) = inverse(m[:, :2]) @ (slice - m[:, 2])
    on_image = (corners - m[:, 2]) @ np.linalg.inv(m[:, :2]).T - 0.5
    left, top = np.floor(on_image.min(axis=0)).astype(int) - 1
    right, bottom = np.ceil(on_image.max(axis=0)).astype(int) + 2
    left, top = max(0, int(left)), max(0, int(top))
    right, bottom = min(s.size, int(right)), min(s.size, int(bottom))
    if right <= left or bottom <= top:
        return np.empty((0, 0), np.float32), (0, 0, 0, 0)
    m[:, 2] += m[:, 0] * left + m[:, 1] * top  # the box's first pixel is the image's (left, top)
    image = Image.fromarray(plane.astype(np.float32, copy=False), mode="F")
    drawn = image.transform((right - left, bottom - top), Image.Transform.AFFINE,
                            tuple(m.ravel()), resample=Image.Resampling.BILINEAR,
                            fillcolor=fill)
    return np.asarray(drawn), (top, bottom, left, right)


def _sample(plane: np.ndarray, s: Slices, k: int, pixels: np.ndarray) -> np.ndarray:
    """Slice ``k``'s values at some image pixels (flat indices), the nearest voxel's."""
    y, x = np.divmod(pixels, s.size)
    m = s.to_slice
    shift = s.per_slice * k
    column = m[0, 0] * (x + 0.5) + m[0, 1] * (y + 0.5) + (m[0, 2] + shift[0])
    row = m[1, 0] * (x + 0.5) + m[1, 1] * (y + 0.5) + (m[1, 2] + shift[1])
    rows, columns = plane.shape
    r = np.clip(row.astype(np.intp), 0, rows - 1)
    c = np.clip(column.astype(np.intp), 0, columns - 1)
    out: np.ndarray = plane[r, c]
    return out


def _depth(s: Slices, k: int, box: Box) -> np.ndarray:
    """Each pixel's depth in mm (along the ray, from the centre plane) on slice ``k``."""
    top, bottom, left, right = box
    x = np.arange(left, right, dtype=np.float32)
    y = np.arange(top, bottom, dtype=np.float32)
    depth: np.ndarray = (s.depth[0] * x[None, :] + s.depth[1] * y[:, None]
                         + np.float32(s.depth[2] * k + s.depth[3]))
    return depth


def _shade(g: Grid, s: Slices, k: int, plane: np.ndarray) -> np.ndarray:
    """Headlight lighting of slice ``k``: 0.3 + 0.7 |cos| between the gradient and the ray."""
    count = g.voxels.shape[s.axis]
    before = _slice(g, s.axis, max(k - 1, 0))
    after = _slice(g, s.axis, min(k + 1, count - 1))
    others = [i for i in range(3) if i != s.axis]
    lengths = np.linalg.norm(g.axes, axis=0)
    g_axis = (after - before) * 0.5
    g_first, g_second = np.gradient(plane)
    along = (s.forward[s.axis] * g_axis + s.forward[others[0]] * g_first
             + s.forward[others[1]] * g_second)
    norm = np.sqrt((g_axis / lengths[s.axis]) ** 2 + (g_first / lengths[others[0]]) ** 2
                   + (g_second / lengths[others[1]]) ** 2) + 1e-3
    shade: np.ndarray = 0.3 + 0.7 * np.minimum(np.abs(along) / norm, 1.0)
    return shade


def composite(g: Grid, s: Slices, tf: TransferFunction, low: float, high: float) -> np.ndarray:
    """Front-to-back alpha compositing of the slices with headlight shading; RGB in 0..1."""
    alpha_table, rgb_table = _table(tf, low, high, s.step_mm)
    scale = (_TABLE - 1) / (high - low)
    colour = np.zeros((s.size * s.size, 3), np.float32)
    through = np.ones(s.size * s.size, np.float32)  # light still reaching this depth
    first_opaque = float(tf.opacity[0][0])
    for k in s.order:
        plane = _slice(g, s.axis, k)
        if float(plane.max()) <= first_opaque:
            continue  # nothing in this slice shows
        drawn, (top, bottom, left, right) = _draw(plane, s, k, low - 1.0)
        # Only rays this slice shows something on and that are not yet opaque are worked on
        # (front to back, an opaque surface ends most rays early).
        lit = through.reshape(s.size, s.size)[top:bottom, left:right] > 0.004
        local = np.flatnonzero((drawn > first_opaque) & lit)
        if local.size == 0:
            continue
        y, x = np.divmod(local, right - left)
        hit = (y + top) * s.size + x + left
        index = ((drawn.ravel()[local] - low) * scale).clip(0, _TABLE - 1).astype(np.intp)
        alpha = alpha_table[index]
        shade = _sample(_shade(g, s, k, plane), s, k, hit)
        light = through[hit]
        colour[hit] += (alpha * light * shade)[:, None] * rgb_table[index]
        through[hit] = light * (1.0 - alpha)
        if float(through.max()) < 0.004:
            break  # every ray is opaque: nothing behind shows
    out: np.ndarray = colour.reshape(s.size, s.size, 3).clip(0.0, 1.0)
    return out


def project_max(g: Grid, s: Slices, fill: float, slab_mm: float = 0.0) -> np.ndarray:
    """The brightest value along each ray; with ``slab_mm`` > 0 only within that thickness
    about the centre plane."""
    image = np.full((s.size, s.size), fill, np.float32)
    for k in s.order:
        values, box = _draw(_slice(g, s.axis, k), s, k, fill)
        top, bottom, left, right = box
        if values.size == 0:
            continue
        if slab_mm > 0:
            values = np.where(np.abs(_depth(s, k, box)) <= slab_mm / 2.0, values, fill)
        part = image[top:bottom, left:right]
        np.maximum(part, values, out=part)
    return image


# -- what the render processes call -------------------------------------------------------------

def check_view(azimuth: float, elevation: float, zoom: float, slab_mm: float,
               preset: str | None, quality: str) -> None:
    """BadView unless the angles, zoom, slab, preset and quality are ones this renders."""
    if not (math.isfinite(azimuth) and 0.0 <= azimuth < 360.0):
        raise BadView("azimuth is 0..359 degrees")
    if not (math.isfinite(elevation) and -90.0 <= elevation <= 90.0):
        raise BadView("elevation is -90..90 degrees")
    if not (math.isfinite(zoom) and 1.0 <= zoom <= MAX_ZOOM):
        raise BadView(f"zoom is 1..{MAX_ZOOM:g}")
    if not (math.isfinite(slab_mm) and 0.0 <= slab_mm <= 1000.0):
        raise BadView("slab is 0 (the whole volume) to 1000 mm")
    if preset is not None and preset not in PRESETS:
        raise BadView(f"3D styles are {', '.join(PRESETS)}")
    if quality not in QUALITIES:
        raise BadView(f"detail is {' or '.join(QUALITIES)}")


def image_size(rendition: Rendition, quality: str) -> tuple[int, int]:
    """(pixels rendered across, pixels sent across): low quality renders fewer and scales
    up; the full view renders at most 384 across (the volume is built <= 256 wide)."""
    wanted = min(rendition.width or 512, 2048)  # a viewport may ask up to 8192
    if quality == "low":
        return min(wanted, 160), wanted
    return min(wanted, 384), wanted


def render_3d(g: Grid, preset: str, is_ct: bool, window: Window | None, azimuth: float,
              elevation: float, size: int, zoom: float = 1.0) -> np.ndarray:
    """A volume rendering, RGB uint8 of ``size`` x ``size``."""
    tf, low, high = _ramps(preset, is_ct, window, g.voxels)
    s = slices(g, camera(azimuth, elevation), size, zoom)
    return (composite(g, s, tf, low, high) * 255.0 + 0.5).astype(np.uint8)


def render_mip(g: Grid, azimuth: float, elevation: float, size: int, zoom: float = 1.0,
               slab_mm: float = 0.0) -> np.ndarray:
    """An oblique maximum-intensity projection in modality units, ``size`` x ``size``."""
    s = slices(g, camera(azimuth, elevation), size, zoom)
    return project_max(g, s, float(g.voxels.min()), slab_mm)


def to_bytes(pixels: np.ndarray, sent: int, rendition: Rendition) -> bytes:
    """Scale a rendered square up to ``sent`` pixels when it was rendered smaller, encode."""
    if pixels.shape[0] < sent:
        mode = "RGB" if pixels.ndim == 3 else "L"
        pixels = np.asarray(Image.fromarray(pixels, mode=mode).resize(
            (sent, sent), Image.Resampling.BILINEAR))
    return encode(pixels, 1.0, rendition)


def mip_bytes(g: Grid, mip_window: Window | None, azimuth: float, elevation: float,
              zoom: float, slab_mm: float, quality: str, rendition: Rendition) -> bytes:
    """An encoded oblique MIP: the asked window, else the volume's MIP window."""
    rendered, sent = image_size(rendition, quality)
    image = render_mip(g, azimuth, elevation, rendered, zoom, slab_mm)
    window = rendition.window or mip_window
    if window is None:
        low, high = (float(v) for v in np.percentile(image, [1.0, 99.8]))
        window = Window((low + high) / 2.0, max(high - low, 1.0))
    return to_bytes(window_to_8bit(image, window), sent, rendition)


@dataclass(frozen=True)
class Turn:
    """A turned view asked for: angles (degrees), zoom, slab (mm, 0 the whole volume), the
    preset of a volume rendering (None: a MIP) and the quality ("low" while turning)."""

    azimuth: float = 0.0
    elevation: float = 0.0
    zoom: float = 1.0
    slab_mm: float = 0.0
    preset: str | None = None
    quality: str = "full"

    def __post_init__(self) -> None:
        check_view(self.azimuth, self.elevation, self.zoom, self.slab_mm, self.preset,
                   self.quality)

    def key(self) -> str:
        """What names this view in a cache key."""
        return (f"{self.azimuth!r}:{self.elevation!r}:{self.zoom!r}:{self.slab_mm!r}:"
                f"{self.preset}:{self.quality}")


def render_turned(g: Grid, low_g: Grid, is_ct: bool, window: Window | None,
                  mip_window: Window | None, turn: Turn, rendition: Rendition) -> bytes:
    """An encoded turned view: a volume rendering when ``turn.preset`` is set, else an
    oblique MIP. ``low_g`` is ``halved(g)``, used for the low quality of a 3D view."""
    if turn.preset is None:
        return mip_bytes(low_g if turn.quality == "low" else g, mip_window, turn.azimuth,
                         turn.elevation, turn.zoom, turn.slab_mm, turn.quality, rendition)
    rendered, sent = image_size(rendition, turn.quality)
    pixels = render_3d(low_g if turn.quality == "low" else g, turn.preset, is_ct, window,
                       turn.azimuth, turn.elevation, rendered, turn.zoom)
    return to_bytes(pixels, sent, rendition)
