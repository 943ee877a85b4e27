// The 3D view: a volume rendering (bone, vessels, soft tissue, skin) or an oblique MIP with a
// slab, rendered on the server (/volume/3d, /volume/mip) and turned by one finger about two
// axes, pinched to zoom. While a finger turns it, small quick images ("detail=low") follow
// the finger; the full image comes on release. The camera is in the patient's coordinates
// (portal/imaging/render3d.py), so the letters at the edges depend on the angles only.
import { attachGestures } from './gestures.js';
import { clamp, directionLetters } from './geometry.js';

const STEP = 5; // degrees: the server renders angles in steps of 5
const DEGREES_PER_PIXEL = 0.5;

/**
 * The patient directions at the image's edges for a view turned by azimuth and elevation
 * (degrees); the same as render3d.letters on the server.
 * @param {number} azimuth @param {number} elevation
 */
export function viewLetters(azimuth, elevation) {
  const a = (azimuth * Math.PI) / 180;
  const e = (elevation * Math.PI) / 180;
  const right = [Math.cos(a), Math.sin(a), 0];
  const ahead = [-Math.sin(a), Math.cos(a), 0];
  const up = [Math.sin(e) * ahead[0], Math.sin(e) * ahead[1], Math.cos(e)];
  const neg = (/** @type {number[]} */ v) => v.map((x) => -x);
  return {
    top: directionLetters(up), bottom: directionLetters(neg(up)),
    right: directionLetters(right), left: directionLetters(neg(right)),
  };
}

/** @param {number} a */
const snap = (a) => Math.round(a / STEP) * STEP;

/**
 * @param {{stage: HTMLElement, base: string, widths: number[], onChange: () => void,
 *   onTrouble: () => void}} options
 */
export function createTurnView({ stage, base, widths, onChange, onTrouble }) {
  const layer = document.createElement('div');
  layer.className = 'turn3d';
  layer.setAttribute('aria-hidden', 'true');
  Object.assign(layer.style, {
    position: 'absolute', inset: '0', background: '#000', touchAction: 'none',
    display: 'none', overflow: 'hidden',
  });
  const img = document.createElement('img');
  img.alt = '';
  img.draggable = false;
  Object.assign(img.style, {
    position: 'absolute', left: '50%', top: '50%', maxWidth: 'none', userSelect: 'none',
    transformOrigin: '50% 50%', pointerEvents: 'none',
  });
  layer.appendChild(img);
  // Under the information overlay (names, letters) and the scrollbar, over the canvas.
  stage.insertBefore(layer, stage.querySelector('.info'));

  const view = { azimuth: 0, elevation: 0, zoom: 1, style: 'bone', slab: 0, open: false };
  let turning = false;
  /** @type {{url: string, detail: string} | null} */ let shown = null;
  /** @type {HTMLImageElement | null} */ let loading = null;
  let loadingUrl = '';

  function size() {
    const box = stage.getBoundingClientRect();
    const css = Math.min(box.width, box.height) * 0.98;
    return { css, px: css * (window.devicePixelRatio || 1) };
  }

  /** @param {'low' | 'full'} detail */
  function urlFor(detail) {
    const params = new URLSearchParams();
    params.set('angle', String((snap(view.azimuth) % 360 + 360) % 360));
    params.set('elevation', String(clamp(snap(view.elevation), -90, 90)));
    params.set('zoom', String(Math.round(view.zoom * 4) / 4));
    if (view.style === 'mip') { if (view.slab) params.set('slab', String(view.slab)); } else params.set('style', view.style);
    params.set('detail', detail);
    // 512 across is enough for a phone (the volume is built <= 256 wide).
    params.set('width', String(widths.filter((w) => w <= 512 && w >= size().px * 0.5)[0] || 512));
    return `${base}/volume/${view.style === 'mip' ? 'mip' : '3d'}?${params}`;
  }

  function place() {
    const { css } = size();
    // The image on screen follows the pinch at once; the server's zoom comes with it.
    const asked = Math.round(view.zoom * 4) / 4;
    const shownZoom = Number(new URL(img.src || 'http://x/?zoom=1', location.href).searchParams.get('zoom')) || asked;
    const scale = view.zoom / shownZoom;
    img.style.width = `${css}px`;
    img.style.height = `${css}px`;
    img.style.transform = `translate(-50%, -50%) scale(${scale})`;
  }

  /** Ask for the image of the current angles (one request at a time, the newest wins). */
  function load() {
    if (!view.open) return;
    const detail = turning ? 'low' : 'full';
    const url = urlFor(detail);
    if (shown && shown.url === url) return;
    if (loading) { if (loadingUrl === url) return; if (turning) return; } // one at a time while turning
    const next = new Image();
    loading = next;
    loadingUrl = url;
    next.decoding = 'async';
    next.onload = () => {
      if (loading === next) loading = null;
      if (!view.open) return;
      img.src = url;
      shown = { url, detail };
      stage.closest('.viewer')?.setAttribute('data-turn-src', url);
      stage.closest('.viewer')?.setAttribute('data-turn-detail', detail);
      place();
      load(); // the finger may have moved on meanwhile
    };
    next.onerror = () => {
      if (loading === next) loading = null;
      onTrouble();
    };
    next.src = url;
  }

  function changed() {
    stage.closest('.viewer')?.setAttribute('data-turn', `${snap(view.azimuth)},${snap(view.elevation)}`);
    place();
    load();
    onChange();
  }

  attachGestures(layer, {
    dragStart() { turning = true; },
    drag(dx, dy) {
      view.azimuth = (view.azimuth - dx * DEGREES_PER_PIXEL + 360) % 360; // the object follows the finger
      view.elevation = clamp(view.elevation + dy * DEGREES_PER_PIXEL, -90, 90);
      changed();
    },
    dragEnd() { turning = false; load(); },
    cancel() { turning = false; load(); },
    pinch(factor) { view.zoom = clamp(view.zoom * factor, 1, 4); changed(); },
    doubleTap() { view.zoom = view.zoom > 1 ? 1 : 2; changed(); },
    wheelSlices(steps) { view.azimuth = (view.azimuth + steps * STEP + 360) % 360; changed(); },
    wheelZoom(factor) { view.zoom = clamp(view.zoom * factor, 1, 4); changed(); },
  });
  // The viewer's own gestures (slices, window, measure) are for the canvas below.
  for (const type of ['pointerdown', 'pointermove', 'pointerup', 'pointercancel', 'wheel']) {
    layer.addEventListener(type, (e) => e.stopPropagation());
  }
  new ResizeObserver(() => { if (view.open) place(); }).observe(stage);

  return {
    view,
    /** Show the 3D view (once the volume is built). */
    open() {
      if (view.open) return;
      view.open = true;
      layer.style.display = 'block';
      changed();
    },
    close() {
      view.open = false;
      turning = false;
      layer.style.display = 'none';
    },
    /** Turn by keyboard steps (arrows): sideways about the vertical axis. */
    /** @param {number} steps */
    step(steps) { view.azimuth = (view.azimuth + steps * STEP + 360) % 360; changed(); },
    /** @param {string} style bone, vessels, soft, skin or mip @param {number} slab mm */
    setStyle(style, slab) { view.style = style; view.slab = slab; changed(); },
    reset() { view.azimuth = 0; view.elevation = 0; view.zoom = 1; changed(); },
    letters() { return viewLetters(snap(view.azimuth), clamp(snap(view.elevation), -90, 90)); },
    where() {
      const name = { bone: 'Bone', vessels: 'Vessels', soft: 'Soft tissue', skin: 'Skin', mip: 'MIP' }[view.style] || '3D';
      const slab = view.style === 'mip' && view.slab ? ` ${view.slab} mm` : '';
      return `3D ${name}${slab} · ${snap(view.azimuth) % 360}°/${clamp(snap(view.elevation), -90, 90)}°`;
    },
    detail() { return shown ? shown.detail : ''; },
  };
}
