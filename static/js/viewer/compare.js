// The prior beside the current (templates/studies/compare.html): two stacks, scrolling linked
// by the position in the patient, one window for both. Positions come from the server
// (portal/studies/prior.py): Image Position Patient along the slice normal in mm. The same
// Frame of Reference links by that position; other series by the position relative to each
// series' first and last slice; series without geometry by the relative slice number.
import { pickWidth } from './geometry.js';

const root = /** @type {HTMLElement} */ (document.getElementById('compare'));
const data = JSON.parse(/** @type {HTMLElement} */ (document.getElementById('compare-data')).textContent || '{}');
const status = /** @type {HTMLElement} */ (root.querySelector('.status'));
const WIDTHS = [64, 128, 256, 512, 1024, 2048];
/** @typedef {{center: number, width: number}} Win */
/** @type {Win | null} */ let win = data.window;
let isDefault = true;

/**
 * @typedef {{study: string, series: string, frames: [string, number][], positions: number[] | null,
 *   frameOfReference: string, columns: number | null, index: number, el: HTMLElement,
 *   stage: HTMLElement, img: HTMLImageElement, pos: HTMLElement}} Pane
 */
/** @type {Pane[]} */
const panes = data.panes.map((/** @type {any} */ p, /** @type {number} */ i) => {
  const el = /** @type {HTMLElement} */ (root.querySelector(`.cpane[data-pane="${i}"]`));
  return { ...p, index: Math.floor(p.frames.length / 2), el,
    stage: /** @type {HTMLElement} */ (el.querySelector('.cstage')),
    img: /** @type {HTMLImageElement} */ (el.querySelector('img')),
    pos: /** @type {HTMLElement} */ (el.querySelector('.cpos')) };
});

const same = panes[0].positions && panes[1].positions && panes[0].frameOfReference
  && panes[0].frameOfReference === panes[1].frameOfReference;
root.dataset.linked = same ? 'position' : panes[0].positions && panes[1].positions ? 'relative-position' : 'relative';

/** The index in ``to`` showing the place ``from`` shows now. @param {Pane} from @param {Pane} to */
function follow(from, to) {
  const n = to.frames.length;
  if (from.positions && to.positions) {
    let target = from.positions[from.index];
    if (!same) {
      const a0 = from.positions[0]; const a1 = from.positions[from.positions.length - 1];
      const f = a1 === a0 ? 0.5 : (target - a0) / (a1 - a0);
      target = to.positions[0] + f * (to.positions[n - 1] - to.positions[0]);
    }
    let best = 0;
    for (let i = 1; i < n; i += 1) if (Math.abs(to.positions[i] - target) < Math.abs(to.positions[best] - target)) best = i;
    return best;
  }
  const f = from.frames.length > 1 ? from.index / (from.frames.length - 1) : 0.5;
  return Math.round(f * (n - 1));
}

const round = (/** @type {number} */ v) => (Math.abs(v) >= 10 ? Math.round(v) : Math.round(v * 10) / 10);

/** @param {Pane} p */
function show(p) {
  const [sop, frame] = p.frames[p.index];
  const box = p.stage.getBoundingClientRect();
  const width = pickWidth(Math.max(box.width, box.height) * (window.devicePixelRatio || 1), p.columns || 512, WIDTHS);
  const params = new URLSearchParams({ width: String(width) });
  if (win && !isDefault) params.set('window', `${round(win.center)},${round(win.width)},linear`);
  const url = `/dicomweb/studies/${encodeURIComponent(p.study)}/series/${encodeURIComponent(p.series)}`
    + `/instances/${encodeURIComponent(sop)}/frames/${frame}/rendered?${params.toString().replace(/%2C/g, ',')}`;
  if (p.img.getAttribute('src') !== url) p.img.src = url;
  p.el.dataset.index = String(p.index);
  p.stage.setAttribute('aria-valuenow', String(p.index + 1));
  const mm = p.positions ? ` · ${p.positions[p.index].toFixed(1)} mm` : '';
  p.pos.textContent = `${p.index + 1}/${p.frames.length}${mm}`;
  p.stage.setAttribute('aria-valuetext', `image ${p.index + 1} of ${p.frames.length}${mm}`);
}

/** Move one pane, and the other to the same place. @param {Pane} p @param {number} index */
function go(p, index) {
  const next = Math.max(0, Math.min(p.frames.length - 1, Math.round(index)));
  if (next === p.index) return;
  p.index = next;
  const other = panes[p === panes[0] ? 1 : 0];
  other.index = follow(p, other);
  show(p);
  show(other);
}

for (const p of panes) {
  let startY = 0; let startIndex = 0; let dragging = false;
  const step = () => Math.max(4, Math.min(24, (p.stage.clientHeight * 1.5) / p.frames.length));
  p.stage.addEventListener('pointerdown', (e) => {
    dragging = true; startY = e.clientY; startIndex = p.index;
    p.stage.setPointerCapture(e.pointerId);
    e.preventDefault();
  });
  p.stage.addEventListener('pointermove', (e) => {
    if (dragging) go(p, startIndex + (startY - e.clientY) / step()); // finger up: onwards
  });
  for (const end of ['pointerup', 'pointercancel']) p.stage.addEventListener(end, () => { dragging = false; });
  p.stage.addEventListener('wheel', (e) => { e.preventDefault(); go(p, p.index + Math.sign(e.deltaY)); }, { passive: false });
  p.stage.addEventListener('keydown', (e) => {
    const by = /** @type {Record<string, number>} */ ({ ArrowDown: 1, ArrowRight: 1, ArrowUp: -1, ArrowLeft: -1, PageDown: 10, PageUp: -10 })[e.key];
    if (by) { e.preventDefault(); go(p, p.index + by); }
    else if (e.key === 'Home') { e.preventDefault(); go(p, 0); }
    else if (e.key === 'End') { e.preventDefault(); go(p, p.frames.length - 1); }
  });
}

const select = /** @type {HTMLSelectElement | null} */ (root.querySelector('select[name=preset]'));
select?.addEventListener('change', () => {
  isDefault = select.value === 'default';
  win = isDefault ? data.window : data.presets[Number(select.value)];
  root.dataset.window = win ? `${round(win.center)},${round(win.width)}` : '';
  for (const p of panes) show(p);
  status.textContent = `Window ${select.options[select.selectedIndex].text} on both.`;
});

panes[1].index = follow(panes[0], panes[1]);
for (const p of panes) show(p);
new ResizeObserver(() => { for (const p of panes) show(p); }).observe(root);
root.classList.add('ready');
