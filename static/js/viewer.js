// The full-screen viewer: server renditions on a canvas, gestures, windowing, reformats,
// measurements. Data about the series comes inline (#viewer-data); images from /dicomweb.
import { number, pageText } from './page_text.js';
import { attachGestures } from './viewer/gestures.js';
import { ImageStore } from './viewer/loader.js';
import { loadStack } from './viewer/stack.js';
import { clamp, lengthMm, markers, pickWidth, windowMap } from './viewer/geometry.js';
import { sessionEnded, showSessionEnded } from './viewer/session.js';
import { createMeasure } from './viewer/measure.js';
import { createTurnView, viewLetters } from './viewer/volume3d.js';

/** @typedef {{center: number, width: number}} Win */

const data = JSON.parse(/** @type {HTMLElement} */ (document.getElementById('viewer-data')).textContent || '{}');
const root = /** @type {HTMLElement} */ (document.getElementById('viewer'));
const $ = (/** @type {string} */ s) => /** @type {HTMLElement} */ (root.querySelector(s));
const stage = $('.stage');
const canvas = /** @type {HTMLCanvasElement} */ ($('canvas'));
const ctx = /** @type {CanvasRenderingContext2D} */ (canvas.getContext('2d'));
const svg = $('svg.marks');
const status = $('.status');
const reduceMotion = matchMedia('(prefers-reduced-motion: reduce)').matches;
const SVGNS = 'http://www.w3.org/2000/svg';
const VOLUME_STEPS = 64;
const MIP_STEP = 5;

const base = `/dicomweb/studies/${encodeURIComponent(data.study)}/series/${encodeURIComponent(data.series)}`;
const frames = /** @type {[string, number][]} */ (data.frames);
const defaultWindow = /** @type {Win | null} */ (data.window);

// A key image link names its instance (and a sign-in after an ended session also its frame
// and view): start there (else at the first image).
const startParams = new URLSearchParams(window.location.search);
const startUid = startParams.get('image');
const startFrame = Number(startParams.get('frame')) || 0;
const startIndex = Math.max(0, startUid ? frames.findIndex((f) => f[0] === startUid
  && (!startFrame || f[1] === startFrame)) : 0);

const state = {
  view: 'stack', index: startIndex, angle: 0,
  /** @type {Record<string, number>} */ positions: { axial: 0.5, coronal: 0.5, sagittal: 0.5 },
  zoom: 1, panX: 0, panY: 0,
  /** @type {Win | null} */ window: defaultWindow ? { ...defaultWindow } : null,
  invert: false, tool: 'scroll', info: true, playing: false, fps: data.fps || 10,
  /** @type {{key: string, a: {x: number, y: number}, b: {x: number, y: number}, saved?: boolean}[]} */ measures: [],
  /** @type {{key: string, a: {x: number, y: number}, b: {x: number, y: number}} | null} */ draft: null,
  adjusting: false,
};

/** What each loaded URL shows: the frame key, the window it was rendered with, its width. */
/** @type {Map<string, {url: string, window: Win | null, width: number, full: boolean}[]>} */
const loaded = new Map();
const store = new ImageStore({ concurrency: 6, onLoad, onTrouble: netState });

// -- what to ask for ------------------------------------------------------------------------

const round = (/** @type {number} */ v) => (Math.abs(v) >= 10 ? Math.round(v) : Math.round(v * 10) / 10);
const winKey = (/** @type {Win | null} */ w) => (w ? `${round(w.center)},${round(w.width)}` : 'auto');
const isDefault = (/** @type {Win | null} */ w) => !w || winKey(w) === winKey(defaultWindow);

/**
 * What a key names: `s12` the 13th slice of the stack, `sagittal31` step 31 of a reformat
 * plane, `mip45` the MIP turned 45°. Parsed whole: "sagittal" also begins with an "s".
 * @param {string} key
 */
function parseKey(key) {
  const found = /^(s|axial|coronal|sagittal|mip)(\d+)$/.exec(key);
  if (!found) throw new Error(`unknown image key ${key}`);
  return { kind: found[1], n: Number(found[2]) };
}

/** The key of what is on screen now (a slice, a reformat plane or a MIP angle). */
function currentKey() {
  if (state.view === 'stack') return `s${state.index}`;
  if (state.view === 'mip') return `mip${state.angle}`;
  if (state.view === '3d') return 'v3d'; // its images are volume3d.js's own
  return `${state.view}${Math.round(state.positions[state.view] * (VOLUME_STEPS - 1))}`;
}

function nativeWidth() {
  return state.view === 'stack' ? data.columns || 512 : 256; // reformats are built <= 256 wide
}

/** The width to ask for at the current screen size and zoom (never above 2048). */
function wantedWidth(zoom = 1) {
  const box = stage.getBoundingClientRect();
  const ar = aspect();
  const css = Math.min(box.width, box.height / ar) * zoom;
  return pickWidth(css * (window.devicePixelRatio || 1), nativeWidth(), data.widths);
}

/**
 * @param {string} key
 * @param {'thumb' | 'full'} kind
 * @param {number} width
 * @param {Win | null} win
 */
function urlFor(key, kind, width, win) {
  const params = new URLSearchParams();
  const { kind: what, n } = parseKey(key);
  let path;
  if (what === 's') {
    const [sop, frame] = frames[n];
    path = `${base}/instances/${encodeURIComponent(sop)}/frames/${frame}/${kind === 'thumb' ? 'thumbnail' : 'rendered'}`;
    if (kind === 'thumb') return path;
    params.set('width', String(width));
    if (!isDefault(win) && win) params.set('window', `${round(win.center)},${round(win.width)},linear`);
    // The page's signed token: a cached image is answered before the app (issue 17).
    if (data.signed && data.signed[sop]) params.set('t', data.signed[sop]);
  } else {
    path = `${base}/volume/${what}`;
    if (what === 'mip') params.set('angle', String(n));
    else params.set('position', (n / (VOLUME_STEPS - 1)).toFixed(4));
    params.set('width', String(width));
    if (win) params.set('window', `${round(win.center)},${round(win.width)},linear`);
  }
  // Commas stay literal (as PS3.18 writes them); URLSearchParams would encode them.
  return `${path}?${params.toString().replace(/%2C/g, ',')}`;
}

/** @type {Map<string, {key: string, window: Win | null, width: number, full: boolean}>} */
const meaning = new Map();

/**
 * @param {{url: string, priority: number}[]} wants
 * @param {string} key @param {'thumb' | 'full'} kind @param {number} width
 * @param {Win | null} win @param {number} priority
 */
function want(wants, key, kind, width, win, priority) {
  const url = urlFor(key, kind, width, win);
  if (!meaning.has(url)) {
    meaning.set(url, { key, window: kind === 'thumb' || isDefault(win) ? defaultWindow : win,
      width: kind === 'thumb' ? 128 : width, full: kind === 'full' });
  }
  wants.push({ url, priority });
}

let direction = 1;

// Every slice's preview comes in one request, the series' stack (viewer/stack.js): scrolling
// shows them at once; full-size images are asked for once the slice stays put ("calm").
const stack = { state: 'loading', planned: state.index, movedAt: -1e9, timer: 0 };

/** True when the slice has not changed for 150 ms (or cine plays: it wants full size). */
function calm() {
  if (state.index !== stack.planned) { stack.planned = state.index; stack.movedAt = performance.now(); }
  const still = state.playing || performance.now() - stack.movedAt >= 150;
  if (!still && !stack.timer) stack.timer = window.setTimeout(() => { stack.timer = 0; plan(); }, 160);
  return still;
}

/** Tell the loader what to fetch now: on screen first, then around it, then previews. */
function plan() {
  /** @type {{url: string, priority: number}[]} */
  const wants = [];
  const width = wantedWidth();
  const win = state.adjusting ? null : state.window;
  const live = state.adjusting ? lastExactWindow : state.window;
  if (state.view === 'stack') {
    const n = frames.length;
    const key = currentKey();
    const streaming = stack.state === 'loading';
    const still = calm();
    if (!bestFor(key) && !streaming) want(wants, key, 'thumb', 128, null, 0);
    if (still) want(wants, key, 'full', width, live, 1);
    const zoomed = wantedWidth(state.zoom);
    if (still && zoomed > width) want(wants, key, 'full', zoomed, live, 1.5);
    const ahead = still && !streaming ? 30 : 0; // the stack's bytes first while it streams
    const behind = 10;
    for (let d = 1; d <= ahead; d += 1) {
      for (const s of [direction, -direction]) {
        const i = state.index + s * d;
        if (i < 0 || i >= n || (s !== direction && d > behind)) continue;
        want(wants, `s${i}`, 'full', width, live, d <= 3 ? 2 + d : 12 + d * (s === direction ? 1 : 2));
      }
    }
    // Previews make every slice scrollable at once; a very long series gets them nearby only.
    const reach = n <= 1000 ? n : 150;
    for (let i = Math.max(0, state.index - reach); i < Math.min(n, state.index + reach + 1); i += 1) {
      if (!streaming) want(wants, `s${i}`, 'thumb', 128, null, 10 + Math.abs(i - state.index) / n);
      // Small series load whole in the background, so every slice scrolls at full size.
      if (still && !streaming && n <= 400 && isDefault(live)) want(wants, `s${i}`, 'full', width, live, 100 + Math.abs(i - state.index));
    }
  } else if (volume.state !== 'ready') {
    checkVolume(); // reformats are cut once the volume is built; meanwhile its progress shows
  } else if (state.view === '3d') {
    turnView.open(); // it asks for its own images as it turns
  } else if (state.view === 'mip') {
    for (let d = 0; d <= 3; d += 1) {
      for (const s of d ? [1, -1] : [1]) {
        const angle = (state.angle + s * d * MIP_STEP + 360) % 360;
        want(wants, `mip${angle}`, 'full', width, live || win, d === 0 ? 0 : 2 + d);
      }
    }
  } else {
    const step = Math.round(state.positions[state.view] * (VOLUME_STEPS - 1));
    for (let d = 0; d <= 2; d += 1) {
      for (const s of d ? [1, -1] : [1]) {
        const k = step + s * d * 2;
        if (k < 0 || k >= VOLUME_STEPS) continue;
        want(wants, `${state.view}${k}`, 'full', width, live || win, d === 0 ? 0 : 2 + d);
      }
    }
  }
  store.plan(wants);
}
let lastExactWindow = state.window;

/** @param {string} url @param {boolean} ok */
function onLoad(url, ok) {
  const info = meaning.get(url);
  if (!info) return;
  if (!ok) {
    if (info.key === currentKey()) {
      // First ask whether the session has ended: then that is what the reader must hear.
      const back = placeNow();
      sessionEnded(url).then((ended) => {
        if (ended) { stopCine(); showSessionEnded(back); return; }
        if (info.key !== currentKey()) return;
        say(state.view === 'stack' ? 'This image could not be shown.'
          : 'This series cannot be shown as a reformat: its slices do not form a volume.');
        if (state.view !== 'stack') setView('stack');
      });
    }
    return;
  }
  const list = loaded.get(info.key) || [];
  list.push({ url, window: info.window, width: info.width, full: info.full });
  loaded.set(info.key, list);
  if (info.key === currentKey()) invalidate();
  progress();
  // Once the first slice is on screen, have the volume built for reformats (if it is not).
  if (info.full && data.volume && volume.state === 'unknown') checkVolume();
}

/** This viewer's address for the image and view on screen (where a new sign-in returns). */
function placeNow() {
  const [sop, frame] = frames[state.index];
  const params = new URLSearchParams({ image: sop });
  if (frame > 1) params.set('frame', String(frame));
  if (state.view !== 'stack') params.set('view', state.view);
  return `${window.location.pathname}?${params}`;
}

/**
 * The best loaded image for a key: the current window first, then the widest.
 * @param {string} key
 */
function bestFor(key) {
  const list = loaded.get(key);
  if (!list) return null;
  let best = null;
  let score = -1;
  for (const entry of list) {
    const img = store.get(entry.url);
    if (!img) continue;
    const exact = winKey(entry.window) === winKey(state.window) ? 10000 : 0;
    const s = exact + (entry.full ? 5000 : 0) + entry.width;
    if (s > score) { best = { img, ...entry, exact: exact > 0 }; score = s; }
  }
  return best;
}

// -- drawing ----------------------------------------------------------------------------------

function aspect() {
  const shown = bestFor(currentKey());
  if (shown) return shown.img.naturalHeight / shown.img.naturalWidth;
  if (state.view === 'stack' && data.rows && data.columns) return data.rows / data.columns;
  return 1;
}

function layout() {
  const box = stage.getBoundingClientRect();
  const ar = aspect();
  const fit = Math.min(box.width, box.height / ar) * 0.98;
  return { w: box.width, h: box.height, ar, scale: fit * state.zoom, fit };
}

/** @param {number} sx @param {number} sy */
function toImage(sx, sy) {
  const l = layout();
  return { x: (sx - l.w / 2 - state.panX) / l.scale + 0.5, y: (sy - l.h / 2 - state.panY) / l.scale + l.ar / 2 };
}

/** @param {{x: number, y: number}} p */
function toScreen(p) {
  const l = layout();
  return { x: (p.x - 0.5) * l.scale + l.w / 2 + state.panX, y: (p.y - l.ar / 2) * l.scale + l.h / 2 + state.panY };
}

let frameRequest = 0;
function invalidate() {
  if (!frameRequest) frameRequest = requestAnimationFrame(draw);
}

const filterFuncs = [...document.querySelectorAll('#wl-filter feFuncR, #wl-filter feFuncG, #wl-filter feFuncB')];

function draw() {
  frameRequest = 0;
  const dpr = window.devicePixelRatio || 1;
  const box = stage.getBoundingClientRect();
  const cw = Math.round(box.width * dpr);
  const ch = Math.round(box.height * dpr);
  if (canvas.width !== cw || canvas.height !== ch) { canvas.width = cw; canvas.height = ch; }
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.fillStyle = '#000';
  ctx.fillRect(0, 0, cw, ch);
  const shown = bestFor(currentKey());
  root.dataset.quality = shown ? (shown.full ? 'full' : 'preview') : 'none';
  root.dataset.src = shown ? shown.url : ''; // what is drawn (tests and support read it)
  if (shown) {
    const l = layout();
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.imageSmoothingEnabled = true;
    ctx.imageSmoothingQuality = 'high';
    const x = l.w / 2 + state.panX - l.scale / 2;
    const y = l.h / 2 + state.panY - (l.scale * l.ar) / 2;
    ctx.drawImage(shown.img, x, y, l.scale, l.scale * l.ar);
    applyFilter(shown.window);
  }
  drawMarks();
  overlay(shown);
}

/** Exact pixels need no filter; another window is approximated until the server answers. */
/** @param {Win | null} from */
function applyFilter(from) {
  const same = !from || !state.window || winKey(from) === winKey(state.window);
  if (same) {
    canvas.style.filter = state.invert ? 'invert(1)' : '';
    return;
  }
  const m = windowMap(/** @type {Win} */ (from), /** @type {Win} */ (state.window), state.invert);
  for (const f of filterFuncs) {
    f.setAttribute('slope', m.slope.toFixed(4));
    f.setAttribute('intercept', m.intercept.toFixed(4));
  }
  canvas.style.filter = 'url(#wl-filter)';
}

/** mm per image-space unit across and down, or null without pixel spacing. */
function field() {
  if (!data.spacing) return null;
  const [rowSp, colSp] = data.spacing;
  const ar = aspect();
  if (state.view === 'stack') return { across: data.columns * colSp, down: (data.rows * rowSp) / ar };
  const across = state.view === 'sagittal' ? data.rows * rowSp : data.columns * colSp;
  return { across, down: across };
}

/** @param {{x: number, y: number}} a @param {{x: number, y: number}} b */
function label(a, b) {
  const mm = lengthMm(a, b, field());
  if (mm === null) {
    const px = Math.hypot((b.x - a.x) * (data.columns || 1), (b.y - a.y) * (data.columns || 1));
    return `${number(px, 0)} px ${pageText('(no pixel spacing)')}`;
  }
  const approx = data.spacingSource === 'detector' && state.view === 'stack';
  return `${approx ? '≈ ' : ''}${number(mm, 1)} mm${approx ? ` ${pageText('(approx., at detector)')}` : ''}`;
}

// Angles and regions (values from the stored pixels) and saved measurements: viewer/measure.js.
const measure = createMeasure({
  data, root, toScreen, aspect, say, invalidate,
  frameOf: (key) => (state.view === 'stack' && key.startsWith('s') ? frames[Number(key.slice(1))] || null : null),
  keyOf: (sop, frame) => { const i = frames.findIndex((f) => f[0] === sop && f[1] === frame); return i < 0 ? null : `s${i}`; },
  lengths: () => state.measures.filter((m) => !m.saved).map((m) => {
    m.saved = true;
    return { key: m.key, kind: 'length', pts: [m.a, m.b], text: label(m.a, m.b), saved: false };
  }),
});

function drawMarks() {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const key = currentKey();
  measure.draw(svg, key);
  const list = state.measures.filter((m) => m.key === key);
  if (state.draft) list.push(state.draft);
  for (const m of list) {
    const a = toScreen(m.a);
    const b = toScreen(m.b);
    const line = document.createElementNS(SVGNS, 'line');
    line.setAttribute('x1', String(a.x)); line.setAttribute('y1', String(a.y));
    line.setAttribute('x2', String(b.x)); line.setAttribute('y2', String(b.y));
    svg.appendChild(line);
    for (const p of [a, b]) {
      const dot = document.createElementNS(SVGNS, 'circle');
      dot.setAttribute('cx', String(p.x)); dot.setAttribute('cy', String(p.y)); dot.setAttribute('r', '4');
      svg.appendChild(dot);
    }
    const text = document.createElementNS(SVGNS, 'text');
    text.setAttribute('x', String(b.x + 8)); text.setAttribute('y', String(b.y - 8));
    text.textContent = label(m.a, m.b);
    svg.appendChild(text);
  }
}

const views = { stack: 'Slices', axial: 'Axial', coronal: 'Coronal', sagittal: 'Sagittal', mip: '3D MIP' };

/** @param {{full: boolean, exact: boolean} | null} shown */
function overlay(shown) {
  const n = frames.length;
  let where;
  if (state.view === 'stack') where = `Image ${state.index + 1} / ${n}`;
  else if (state.view === 'mip') where = `3D MIP · ${state.angle}°`;
  else if (state.view === '3d') where = turnView.where();
  else where = `${views[/** @type {'axial'} */ (state.view)]} · ${Math.round(state.positions[state.view] * 100)} %`;
  $('.slice').textContent = where;
  $('.wl').textContent = state.window ? `W ${round(state.window.width)} L ${round(state.window.center)}${shown && !shown.exact ? ' …' : ''}` : '';
  $('.zoom').textContent = `${state.zoom.toFixed(state.zoom < 10 ? 1 : 0)}×${shown && !shown.full ? ` · ${pageText('preview')}` : ''}`;
  // The MIP and the 3D view turn in the patient's coordinates: letters on every angle.
  const m = state.view === '3d' ? turnView.letters()
    : state.view === 'mip' ? viewLetters(state.angle, 0) : markers(data.orientation, state.view, state.angle);
  for (const side of /** @type {const} */ (['top', 'right', 'bottom', 'left'])) $(`.om-${side}`).textContent = m[side];
  root.dataset.frame = String(state.index + 1);
  root.dataset.view = state.view;
  root.dataset.zoom = state.zoom.toFixed(3);
  root.dataset.window = winKey(state.window);
  const bar = $('.scroll');
  const value = state.view === 'stack' ? state.index / Math.max(n - 1, 1)
    : state.view === 'mip' ? state.angle / 355 : state.view === '3d' ? turnView.view.azimuth / 360 : state.positions[state.view];
  bar.setAttribute('aria-valuenow', String(state.view === 'stack' ? state.index + 1 : Math.round(value * 100)));
  bar.setAttribute('aria-valuemax', String(state.view === 'stack' ? n : 100));
  bar.setAttribute('aria-valuetext', where);
  const knob = $('.knob');
  knob.style.transform = `translateY(${value * (bar.clientHeight - knob.offsetHeight)}px)`;
}

function progress() {
  if (state.view !== 'stack') { $('.loaded').textContent = ''; return; } // slices only
  let full = 0;
  let any = 0;
  for (let i = 0; i < frames.length; i += 1) {
    const list = loaded.get(`s${i}`);
    if (list && list.length) any += 1;
    if (list && list.some((e) => e.full)) full += 1;
  }
  root.dataset.loaded = String(any);
  root.dataset.loadedFull = String(full);
  $('.loaded').textContent = full < frames.length ? `${full} / ${frames.length} loaded` : '';
}

/** @param {string} text */
let sayTimer = 0;
function say(text) {
  status.textContent = text;
  clearTimeout(sayTimer);
  sayTimer = window.setTimeout(() => { status.textContent = ''; }, 5000);
}

// -- the volume behind reformats, and the network ---------------------------------------------

/** The series' volume on the server: unknown, building (progress 0..1), ready or refused. */
const volume = { state: 'unknown', progress: 0, /** @type {Win | null} */ mipWindow: null };
let volumeTimer = 0;
let volumeAsking = false;
let volumeOffline = false;
let volumeDelay = 1000;

const building = document.createElement('div');
building.className = 'building';
building.hidden = true;
building.setAttribute('role', 'progressbar');
building.setAttribute('aria-label', pageText('Building 3D view'));
building.setAttribute('aria-valuemin', '0');
building.setAttribute('aria-valuemax', '100');
const buildingText = document.createElement('span');
buildingText.className = 'building-text';
const buildingBar = document.createElement('span');
buildingBar.className = 'building-bar';
buildingBar.appendChild(document.createElement('span'));
building.append(buildingText, buildingBar);
stage.appendChild(building);

const netNotice = document.createElement('p');
netNotice.className = 'netstate';
netNotice.setAttribute('role', 'status');
netNotice.setAttribute('aria-live', 'polite');
root.appendChild(netNotice);

/** @param {number | null} share the part of the build done, or null when none is shown */
function showBuilding(share) {
  building.hidden = share === null;
  const percent = Math.round((share || 0) * 100);
  root.dataset.building = share === null ? '' : String(percent);
  if (share === null) return;
  building.setAttribute('aria-valuenow', String(percent));
  /** @type {HTMLElement} */ (building.querySelector('.building-text')).textContent = pageText('Building 3D view… %(percent)s %%', { percent });
  /** @type {HTMLElement} */ (building.querySelector('.building-bar span')).style.transform = `scaleX(${Math.max(share || 0, 0.02)})`;
}

/** Say "Offline, retrying…" while the network is gone or loads wait for it; clear it after. */
function netState() {
  const off = !navigator.onLine || store.offline || volumeOffline;
  netNotice.textContent = off ? 'Offline, retrying…' : '';
  root.dataset.offline = off ? 'yes' : '';
}

/** @param {number} ms */
function checkVolumeIn(ms) {
  clearTimeout(volumeTimer);
  volumeTimer = window.setTimeout(() => { volumeTimer = 0; if (state.view !== 'stack') checkVolume(); }, ms);
}

/** Ask whether the volume is built (which starts its build when nobody is at it). */
async function checkVolume() {
  if (volume.state === 'ready' || volume.state === 'refused' || volumeAsking || volumeTimer) return;
  volumeAsking = true;
  if (state.view !== 'stack') showBuilding(volume.progress);
  let answer = null;
  try {
    answer = await fetch(`${base}/volume`, { headers: { Accept: 'application/json' }, cache: 'no-store', credentials: 'same-origin' });
  } catch {
    answer = null;
  }
  volumeAsking = false;
  volumeOffline = !answer;
  netState();
  if (!answer) { // no network: the same growing pause as images
    checkVolumeIn(volumeDelay);
    volumeDelay = Math.min(volumeDelay * 2, 30000);
    return;
  }
  volumeDelay = 1000;
  const body = await answer.json().catch(() => ({}));
  if (answer.status === 200) {
    volume.state = 'ready';
    volume.mipWindow = body.mipWindow || null;
    if (volume.mipWindow && ![...presetSelect.options].some((o) => o.value === 'mip')) {
      presetSelect.add(new Option(`3D MIP (${round(volume.mipWindow.width)}/${round(volume.mipWindow.center)})`, 'mip'));
    }
    showBuilding(null);
    if (state.view === 'mip') useMipWindow();
    if (state.view !== 'stack') { plan(); invalidate(); }
    return;
  }
  if (answer.status === 202) {
    volume.state = 'building';
    volume.progress = Number(body.progress) || 0;
    if (state.view !== 'stack') { showBuilding(volume.progress); checkVolumeIn(500); }
    return;
  }
  showBuilding(null);
  if (answer.status === 422) volume.state = 'refused';
  if (state.view !== 'stack') {
    say(`This series cannot be shown as a reformat: ${body.error || 'its slices do not form a volume'}.`);
    setView('stack');
  }
}

/** A MIP in a slice's window is white (its rays keep the brightest voxel): use its own. */
function useMipWindow() {
  if (!volume.mipWindow || !isDefault(state.window)) return;
  state.window = { ...volume.mipWindow };
  lastExactWindow = state.window;
  presetSelect.value = 'mip';
}

window.addEventListener('offline', netState);
window.addEventListener('online', () => {
  store.retryNow();
  if (volumeOffline) { volumeDelay = 1000; clearTimeout(volumeTimer); volumeTimer = 0; checkVolume(); }
  netState();
});

// -- actions ----------------------------------------------------------------------------------

/** @param {number} index */
function goTo(index) {
  const next = clamp(Math.round(index), 0, frames.length - 1);
  if (next === state.index) return;
  direction = next > state.index ? 1 : -1;
  state.index = next;
  schedulePlan();
  invalidate();
}

/** @param {number} steps */
function step(steps) {
  if (state.view === 'stack') goTo(state.index + steps);
  else if (state.view === '3d') turnView.step(steps);
  else if (state.view === 'mip') {
    state.angle = (((state.angle + steps * MIP_STEP) % 360) + 360) % 360;
    schedulePlan(); invalidate();
  } else {
    const k = clamp(Math.round(state.positions[state.view] * (VOLUME_STEPS - 1)) + steps, 0, VOLUME_STEPS - 1);
    state.positions[state.view] = k / (VOLUME_STEPS - 1);
    schedulePlan(); invalidate();
  }
}

let planTimer = 0;
function schedulePlan() {
  if (planTimer) return;
  planTimer = window.setTimeout(() => { planTimer = 0; plan(); }, 30);
}

/** @param {number} factor @param {number} x @param {number} y */
function zoomAt(factor, x, y) {
  const box = stage.getBoundingClientRect();
  const next = clamp(state.zoom * factor, 0.5, 40);
  const f = next / state.zoom;
  const px = x - box.width / 2;
  const py = y - box.height / 2;
  state.panX = px - (px - state.panX) * f;
  state.panY = py - (py - state.panY) * f;
  state.zoom = next;
  invalidate();
  zoomSettled();
}

let zoomTimer = 0;
function zoomSettled() {
  clearTimeout(zoomTimer);
  zoomTimer = window.setTimeout(plan, 250); // a sharper image for the zoomed slice only
}

/** @param {string} view */
function setView(view) {
  state.view = view;
  state.zoom = 1; state.panX = 0; state.panY = 0;
  if (view === 'mip') useMipWindow();
  else if (presetSelect.value === 'mip') { // the MIP's own window suits only a MIP
    state.window = defaultWindow ? { ...defaultWindow } : null;
    lastExactWindow = state.window;
    presetSelect.value = 'default';
  }
  /** @type {HTMLSelectElement} */ ($('select[name=view]')).value = view;
  if (view === 'stack') showBuilding(null);
  if (view !== '3d') turnView.close();
  for (const el of root.querySelectorAll('[data-for-view]')) /** @type {HTMLElement} */ (el).hidden = /** @type {HTMLElement} */ (el).dataset.forView !== view;
  plan();
  progress();
  invalidate();
}

/** @param {Win | null} win */
function setWindow(win) {
  state.window = win ? { center: win.center, width: win.width } : null;
  lastExactWindow = state.window;
  plan();
  invalidate();
}

function reset() {
  state.zoom = 1; state.panX = 0; state.panY = 0; state.invert = false;
  state.measures = []; state.draft = null; state.angle = 0;
  turnView.reset();
  measure.clear();
  stopCine();
  setPressed('invert', false);
  /** @type {HTMLSelectElement} */ ($('select[name=preset]')).value = 'default';
  setWindow(defaultWindow);
  say(pageText('View reset.'));
}

/** @param {string} name @param {boolean} on */
function setPressed(name, on) {
  $(`button[data-action=${name}]`)?.setAttribute('aria-pressed', String(on));
}

/** @param {string} tool */
function setTool(tool) {
  state.tool = tool;
  for (const b of root.querySelectorAll('button[data-tool]')) {
    b.setAttribute('aria-pressed', String(/** @type {HTMLElement} */ (b).dataset.tool === tool));
  }
  root.dataset.tool = tool;
}

let cineHandle = 0;
let cineLast = 0;
let cineCarry = 0;
function cineTick(/** @type {number} */ t) {
  if (!state.playing) return;
  if (cineLast) {
    cineCarry += ((t - cineLast) / 1000) * state.fps;
    const whole = Math.floor(cineCarry);
    if (whole) {
      cineCarry -= whole;
      state.index = (state.index + whole) % frames.length;
      schedulePlan();
      invalidate();
    }
  }
  cineLast = t;
  cineHandle = requestAnimationFrame(cineTick);
}
function startCine() {
  if (state.view !== 'stack' || frames.length < 2) return;
  state.playing = true; cineLast = 0; cineCarry = 0;
  const b = $('button[data-action=play]');
  b.setAttribute('aria-pressed', 'true'); b.textContent = pageText('Pause');
  cineHandle = requestAnimationFrame(cineTick);
}
function stopCine() {
  if (!state.playing) return;
  state.playing = false;
  cancelAnimationFrame(cineHandle);
  const b = $('button[data-action=play]');
  b.setAttribute('aria-pressed', 'false'); b.textContent = pageText('Play');
}

async function saveJpeg() {
  const shown = bestFor(currentKey());
  if (!shown) return;
  const out = document.createElement('canvas');
  out.width = canvas.width; out.height = canvas.height;
  const c = /** @type {CanvasRenderingContext2D} */ (out.getContext('2d'));
  c.drawImage(canvas, 0, 0);
  if (canvas.style.filter) { // the on-screen filter is CSS: bake it into the pixels
    const pixels = c.getImageData(0, 0, out.width, out.height);
    const m = shown.window && state.window && winKey(shown.window) !== winKey(state.window)
      ? windowMap(shown.window, state.window, state.invert) : { slope: state.invert ? -1 : 1, intercept: state.invert ? 1 : 0 };
    const d = pixels.data;
    for (let i = 0; i < d.length; i += 4) {
      for (let k = 0; k < 3; k += 1) d[i + k] = clamp(d[i + k] * m.slope + m.intercept * 255, 0, 255);
    }
    c.putImageData(pixels, 0, 0);
  }
  const dpr = window.devicePixelRatio || 1;
  c.scale(dpr, dpr);
  // Every mark as the screen shows it: angles, ellipses and regions with their values, and
  // the saved ones (viewer/measure.js), then the lengths with their dots and words.
  measure.paint(c, currentKey(), out.width / dpr);
  c.strokeStyle = '#ffd400'; c.fillStyle = '#ffd400'; c.lineWidth = 2; c.font = '600 14px system-ui, sans-serif';
  for (const m of state.measures.filter((x) => x.key === currentKey())) {
    const a = toScreen(m.a); const b = toScreen(m.b);
    c.beginPath(); c.moveTo(a.x, a.y); c.lineTo(b.x, b.y); c.stroke();
    for (const p of [a, b]) { c.beginPath(); c.arc(p.x, p.y, 4, 0, 2 * Math.PI); c.fill(); }
    c.strokeStyle = '#000'; c.lineWidth = 3; c.strokeText(label(m.a, m.b), b.x + 8, b.y - 8);
    c.fillText(label(m.a, m.b), b.x + 8, b.y - 8);
    c.strokeStyle = '#ffd400'; c.lineWidth = 2;
  }
  const blob = await new Promise((resolve) => out.toBlob(resolve, 'image/jpeg', 0.92));
  if (!blob) return;
  const link = document.createElement('a');
  link.href = URL.createObjectURL(/** @type {Blob} */ (blob));
  link.download = `image-${data.number ?? 'series'}-${currentKey()}.jpg`;
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  say(pageText('Image saved as JPEG.'));
}

// -- gestures ---------------------------------------------------------------------------------

let carry = 0;
let mode = '';
let fling = 0;
let touching = false;

function stepPixels() {
  const box = stage.getBoundingClientRect();
  const count = state.view === 'stack' ? frames.length : state.view === 'mip' ? 72 : VOLUME_STEPS;
  return clamp((box.height * 1.5) / count, 3, 24);
}

attachGestures(stage, {
  dragStart(x, y, e) {
    cancelAnimationFrame(fling);
    stopCine();
    carry = 0;
    mode = e.shiftKey || (e.pointerType === 'mouse' && e.altKey) ? 'pan' : state.tool;
    touching = e.pointerType === 'touch';
    if (mode === 'measure' && measure.owns()) measure.start(currentKey(), toImage(x, y));
    else if (mode === 'measure') state.draft = { key: currentKey(), a: toImage(x, y), b: toImage(x, y) };
    if (mode === 'window' && state.window) state.adjusting = true;
  },
  drag(dx, dy, x, y) {
    if (mode === 'pan') { state.panX += dx; state.panY += dy; invalidate(); return; }
    if (mode === 'measure' && measure.owns()) { measure.move(toImage(x, y), { x, y }); return; }
    if (mode === 'measure' && state.draft) { state.draft.b = toImage(x, y); invalidate(); return; }
    if (mode === 'window' && state.window) {
      const w = state.window;
      state.window = { width: Math.max(1, w.width + (dx * w.width) / 200), center: w.center + (dy * w.width) / 400 };
      invalidate();
      return;
    }
    carry += state.view === 'mip' ? -dx : -dy; // finger up: onwards; the MIP follows the finger
    const s = Math.trunc(carry / stepPixels());
    if (s) { carry -= s * stepPixels(); step(s); }
  },
  dragEnd(vx, vy) {
    if (mode === 'measure' && measure.owns()) measure.end();
    else if (mode === 'measure' && state.draft) {
      const d = state.draft;
      state.draft = null;
      const far = toScreen(d.a);
      const near = toScreen(d.b);
      if (Math.hypot(far.x - near.x, far.y - near.y) > 8) {
        state.measures.push(d);
        say(`Length ${label(d.a, d.b)}`);
      }
      invalidate();
    } else if (mode === 'window' && state.adjusting) {
      state.adjusting = false;
      /** @type {HTMLSelectElement} */ ($('select[name=preset]')).value = 'custom';
      setWindow(state.window);
    } else if (mode === 'scroll' && touching && !reduceMotion) { // a flick glides on
      let v = state.view === 'mip' ? -vx : -vy; // px per ms
      if (Math.abs(v) > 0.6) {
        let last = performance.now();
        const glide = (/** @type {number} */ t) => {
          const dt = t - last; last = t;
          carry += v * dt;
          const s = Math.trunc(carry / stepPixels());
          if (s) { carry -= s * stepPixels(); step(s); }
          v *= Math.pow(0.995, dt);
          if (Math.abs(v) > 0.05) fling = requestAnimationFrame(glide);
        };
        fling = requestAnimationFrame(glide);
      }
    }
    mode = '';
  },
  cancel() {
    state.draft = null;
    measure.cancel();
    if (state.adjusting) { state.adjusting = false; setWindow(state.window); }
    mode = '';
  },
  pinch(factor, cx, cy, dx, dy) {
    state.panX += dx; state.panY += dy;
    zoomAt(factor, cx, cy);
  },
  doubleTap(x, y) {
    if (state.tool === 'measure') return;
    const l = layout();
    const oneToOne = nativeWidth() / (l.fit * (window.devicePixelRatio || 1));
    if (Math.abs(state.zoom - 1) < 0.05) zoomAt(oneToOne / state.zoom, x, y);
    else { state.zoom = 1; state.panX = 0; state.panY = 0; invalidate(); }
  },
  wheelSlices(steps) { stopCine(); step(steps); },
  wheelZoom(factor, x, y) { zoomAt(factor, x, y); },
});

// The scrollbar: drag or tap to jump; it is also a keyboard slider.
const bar = $('.scroll');
const fromBar = (/** @type {PointerEvent} */ e) => {
  const box = bar.getBoundingClientRect();
  const f = clamp((e.clientY - box.top) / box.height, 0, 1);
  if (state.view === 'stack') goTo(f * (frames.length - 1));
  else if (state.view === 'mip') { state.angle = Math.round((f * 355) / MIP_STEP) * MIP_STEP; schedulePlan(); invalidate(); }
  else { state.positions[state.view] = Math.round(f * (VOLUME_STEPS - 1)) / (VOLUME_STEPS - 1); schedulePlan(); invalidate(); }
};
bar.addEventListener('pointerdown', (e) => { bar.setPointerCapture(e.pointerId); stopCine(); fromBar(e); e.preventDefault(); });
bar.addEventListener('pointermove', (e) => { if (bar.hasPointerCapture(e.pointerId)) fromBar(e); });

// -- toolbar and keyboard ---------------------------------------------------------------------

// On a phone the bar holds the drag tools and "More"; the other tools open in a sheet above
// it, which closes again once one is used (wide screens lay the sheet out inside the bar).
const moreButton = $('button[data-action=more]');
const sheet = $('.sheet');
/** @param {boolean} open @param {boolean} [focusInside] */
function setMore(open, focusInside = false) {
  const wasOpen = root.classList.contains('more-open');
  root.classList.toggle('more-open', open);
  moreButton.setAttribute('aria-expanded', String(open));
  if (open && focusInside) {
    /** @type {HTMLElement | null} */ (sheet.querySelector('select:enabled, button:enabled'))?.focus();
  } else if (!open && wasOpen && sheet.contains(document.activeElement) && moreButton.offsetParent) {
    moreButton.focus(); // what had focus is hidden now: keyboard users go on from "More"
  }
}

root.addEventListener('click', (e) => {
  const button = /** @type {HTMLElement | null} */ (/** @type {HTMLElement} */ (e.target).closest('button'));
  if (!button) return;
  if (button.dataset.tool) setTool(button.dataset.tool);
  const action = button.dataset.action;
  if (action === 'more') setMore(!root.classList.contains('more-open'), e.detail === 0);
  else if (action === 'invert') { state.invert = !state.invert; setPressed('invert', state.invert); invalidate(); }
  else if (action === 'reset') reset();
  else if (action === 'info') { state.info = !state.info; root.classList.toggle('noinfo', !state.info); setPressed('info', state.info); }
  else if (action === 'play') (state.playing ? stopCine() : startCine());
  else if (action === 'save') saveJpeg();
  else if (action === 'save-measures') measure.save();
  else if (action === 'key-image') measure.markKey(currentKey());
  if (sheet.contains(button)) setMore(false);
});
sheet.addEventListener('change', () => setMore(false));
stage.addEventListener('pointerdown', () => setMore(false));

const presetSelect = /** @type {HTMLSelectElement} */ ($('select[name=preset]'));
// One list from the server: the file's windows and the usual ones, each once (viewer.py).
const presets = [...(data.presets || [])];
presets.forEach((p, i) => presetSelect.add(new Option(`${p.name} (${round(p.width)}/${round(p.center)})`, String(i))));
presetSelect.disabled = !state.window;
presetSelect.addEventListener('change', () => {
  const v = presetSelect.value;
  if (v === 'default') setWindow(defaultWindow);
  else if (v === 'mip') setWindow(volume.mipWindow);
  else if (v !== 'custom') setWindow(presets[Number(v)]);
});

const shapeSelect = /** @type {HTMLSelectElement | null} */ (root.querySelector('select[name=shape]'));
shapeSelect?.addEventListener('change', () => { measure.setShape(shapeSelect.value); setTool('measure'); });

const viewSelect = /** @type {HTMLSelectElement} */ ($('select[name=view]'));
if (!data.volume) for (const o of [...viewSelect.options]) if (o.value !== 'stack') o.remove();
viewSelect.disabled = viewSelect.options.length < 2;
viewSelect.addEventListener('change', () => { stopCine(); setView(viewSelect.value); });

// The 3D view (viewer/volume3d.js): its style, or a MIP turned about two axes with a slab.
const turnView = createTurnView({ stage, base, widths: data.widths, onChange: invalidate,
  onTrouble: () => say(pageText('The 3D view could not be shown right now.')) });
const styleSelect = /** @type {HTMLSelectElement | null} */ (root.querySelector('select[name=style3d]'));
styleSelect?.addEventListener('change', () => {
  const [style, slab] = styleSelect.value.split(':');
  turnView.setStyle(style, Number(slab) || 0);
});

const speed = /** @type {HTMLSelectElement | null} */ (root.querySelector('select[name=speed]'));
if (speed) {
  if (![...speed.options].some((o) => Number(o.value) === Math.round(state.fps))) speed.add(new Option(`${Math.round(state.fps)} / s`, String(Math.round(state.fps)), true, true));
  speed.value = String(Math.round(state.fps));
  speed.addEventListener('change', () => { state.fps = Number(speed.value); });
}

document.addEventListener('keydown', (e) => {
  const target = /** @type {HTMLElement} */ (e.target);
  if (e.key === 'Escape' && root.classList.contains('more-open')) { setMore(false); moreButton.focus(); return; }
  if (target.closest('select, input, textarea') || e.altKey || e.metaKey) return;
  if (target.closest('button') && (e.key === ' ' || e.key === 'Enter')) return;
  const keys = /** @type {Record<string, () => void>} */ ({
    ArrowDown: () => step(1), ArrowRight: () => step(1), ArrowUp: () => step(-1), ArrowLeft: () => step(-1),
    PageDown: () => step(10), PageUp: () => step(-10),
    Home: () => step(-frames.length), End: () => step(frames.length),
    '+': () => zoomAt(1.25, stage.clientWidth / 2, stage.clientHeight / 2),
    '=': () => zoomAt(1.25, stage.clientWidth / 2, stage.clientHeight / 2),
    '-': () => zoomAt(0.8, stage.clientWidth / 2, stage.clientHeight / 2),
    i: () => /** @type {HTMLElement} */ ($('button[data-action=invert]')).click(),
    r: () => reset(),
    h: () => /** @type {HTMLElement} */ ($('button[data-action=info]')).click(),
    s: () => setTool('scroll'), w: () => setTool('window'), m: () => setTool('measure'),
    ' ': () => (data.cine ? $('button[data-action=play]').click() : step(1)),
  });
  const run = keys[e.key];
  if (!run || e.ctrlKey) return;
  e.preventDefault();
  if (!e.key.startsWith('Arrow') && !e.key.startsWith('Page')) stopCine();
  run();
});

new ResizeObserver(() => { invalidate(); schedulePlan(); }).observe(stage);
setTool('scroll');
root.classList.add('ready');
const startView = startParams.get('view');
if (startView && startView !== 'stack' && [...viewSelect.options].some((o) => o.value === startView)) setView(startView);
// The stack: each part names its frame (Content-Location); it stands for that slice's preview.
const slotOf = new Map(frames.map(([sop, f], i) => [`${sop}/${f}`, i]));
// WebP at 128 wide, quality 70: about 1.3 KB a CT slice, so a 1.6 Mbps link brings 150 a second.
loadStack(`${base}/rendered?width=128&quality=70`, 'image/webp', (location, blob) => {
  const found = /\/instances\/([^/]+)\/frames\/(\d+)\/rendered/.exec(location);
  const i = found ? slotOf.get(`${decodeURIComponent(found[1])}/${found[2]}`) : undefined;
  if (i === undefined) return;
  const url = urlFor(`s${i}`, 'thumb', 128, null);
  if (!meaning.has(url)) meaning.set(url, { key: `s${i}`, window: defaultWindow, width: 128, full: false });
  store.add(url, blob);
}).then(() => { stack.state = 'done'; }, () => { stack.state = 'failed'; }) // one by one then
  .finally(schedulePlan);
plan();
invalidate();
measure.load();
