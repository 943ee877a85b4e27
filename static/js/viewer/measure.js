// Measurements beyond a length: an angle, an ellipse and a freehand region whose values (area,
// mean, SD, range in HU for CT) the server reads from the stored pixels, and saving them with
// the study (a DICOM presentation state other viewers show). viewer.js keeps lengths; this
// module draws its own marks into the same SVG layer and the saved ones read back.
// Coordinates: the viewer's image space is x 0..1 across, y 0..ar down (ar: height / width);
// the server's are image pixels, (0, 0) the top-left corner of the top-left pixel.

import { number, pageText } from '../page_text.js';

const SVGNS = 'http://www.w3.org/2000/svg';
const DRAWN = '#ffd400'; // static/css/portal.css .marks .shape, .marks .shape.saved
const SAVED = '#7fdcff';
const LINE = 17; // px between the lines of a mark's words

/**
 * Where a mark's words go on screen: two parts a line (about 200 px at 14 px), kept inside
 * the screen, above the shape; null without words.
 * @param {Mark} m @param {Pt[]} s its points on screen @param {number} width the screen's
 * @returns {{x: number, y: number, lines: string[]} | null}
 */
function wordsOf(m, s, width) {
  if (!m.text) return null;
  const top = s.reduce((best, p) => (p.y < best.y ? p : best), s[0]);
  const words = (m.saved && m.author ? `${m.text} · ${m.author}` : m.text).split(' · ');
  const lines = [];
  for (let i = 0; i < words.length; i += 2) lines.push(words.slice(i, i + 2).join(' · '));
  return { x: Math.max(4, Math.min(top.x - 60, width - 210)),
    y: Math.max(16, top.y - 10 - LINE * (lines.length - 1)), lines };
}

/** @typedef {{x: number, y: number}} Pt */
/** @typedef {{key: string, kind: string, pts: Pt[], text: string, saved: boolean, author?: string}} Mark */

/**
 * @param {{data: any, root: HTMLElement, toScreen: (p: Pt) => Pt, aspect: () => number,
 *   say: (t: string) => void, invalidate: () => void, keyOf: (sop: string, frame: number) => string | null,
 *   frameOf: (key: string) => [string, number] | null, lengths: () => Mark[]}} v
 */
export function createMeasure(v) {
  const { data } = v;
  /** @type {Mark[]} */ const marks = [];
  /** @type {Mark | null} */ let draft = null;
  let shape = 'length';
  const columns = data.columns || 1;
  const rows = data.rows || 1;
  const csrf = v.root.dataset.csrf || '';

  /** @param {Pt} p image space to image pixels */
  const toPixels = (p) => [p.x * columns, (p.y / v.aspect()) * rows];
  /** @param {number[]} q image pixels to image space */
  const fromPixels = (q) => ({ x: q[0] / columns, y: (q[1] / rows) * v.aspect() });

  /** Degrees between the arms b->a and b->c, in millimetres where the spacing is known. */
  function angleOf(/** @type {Pt[]} */ pts) {
    const sp = data.spacing || [1, 1];
    const [a, b, c] = pts.map(toPixels);
    const u = [(a[0] - b[0]) * sp[1], (a[1] - b[1]) * sp[0]];
    const w = [(c[0] - b[0]) * sp[1], (c[1] - b[1]) * sp[0]];
    const cos = (u[0] * w[0] + u[1] * w[1]) / (Math.hypot(...u) * Math.hypot(...w) || 1);
    return (Math.acos(Math.max(-1, Math.min(1, cos))) * 180) / Math.PI;
  }

  /** @param {number} n */
  const fmt = (n) => number(n, Math.abs(n) >= 100 ? 0 : 1);

  /** The words beside a region, from the server's answer. */
  function regionText(/** @type {any} */ r) {
    const unit = r.unit ? ` ${r.unit}` : ' (stored values)';
    const area = r.areaUnit === 'mm2'
      ? `${r.approximate ? '≈ ' : ''}${r.area >= 100 ? (r.area / 100).toFixed(2) + ' cm²' : r.area.toFixed(1) + ' mm²'}`
      : `${r.area.toFixed(0)} px² (no calibration)`;
    const approx = r.approximate ? ' (approx., at detector)' : '';
    return `mean ${fmt(r.mean)}${unit} · SD ${fmt(r.sd)} · ${fmt(r.min)} to ${fmt(r.max)} · ${area}${approx}`;
  }

  async function measureRegion(/** @type {Mark} */ m) {
    const at = v.frameOf(m.key);
    if (!at) { m.text = 'values only on the slices view'; v.invalidate(); return; }
    const pts = m.kind === 'ellipse' ? m.pts.slice(0, 2) : m.pts;
    m.text = 'measuring…';
    v.invalidate();
    const url = `/studies/${encodeURIComponent(data.study)}/series/${encodeURIComponent(data.series)}`
      + `/instances/${encodeURIComponent(at[0])}/frames/${at[1]}/roi`;
    try {
      const answer = await fetch(url, {
        method: 'POST', credentials: 'same-origin',
        headers: { 'Content-Type': 'application/json', ...(csrf ? { 'X-CSRF-Token': csrf } : {}) },
        body: JSON.stringify({ kind: m.kind, points: pts.map(toPixels) }),
      });
      const body = await answer.json().catch(() => ({}));
      m.text = answer.ok ? regionText(body) : `not measured: ${body.error || body.message || answer.status}`;
    } catch {
      m.text = 'not measured: no connection';
    }
    v.say(`${m.kind === 'ellipse' ? 'Ellipse' : 'Region'}: ${m.text}`);
    v.root.dataset.measured = String(Number(v.root.dataset.measured || 0) + 1); // tests wait on it
    v.invalidate();
  }

  const api = {
    get shape() { return shape; },
    /** @param {string} s */
    setShape(s) { shape = s; draft = null; v.invalidate(); },
    /** True when this module handles the drag (every shape but the viewer's own length). */
    owns() { return shape !== 'length'; },
    /** @param {string} key @param {Pt} p */
    start(key, p) {
      if (shape === 'angle' && draft && draft.kind === 'angle' && draft.key === key && draft.pts.length === 2) {
        draft.pts.push(p); // the second arm: from the vertex to the finger
        return;
      }
      draft = { key, kind: shape, pts: shape === 'polygon' ? [p] : [p, { ...p }], text: '', saved: false };
    },
    /** @param {Pt} p @param {Pt} screen */
    move(p, screen) {
      if (!draft) return;
      if (draft.kind === 'polygon') {
        const last = v.toScreen(draft.pts[draft.pts.length - 1]);
        if (Math.hypot(last.x - screen.x, last.y - screen.y) >= 3 && draft.pts.length < 900) draft.pts.push(p);
      } else draft.pts[draft.pts.length - 1] = p;
      v.invalidate();
    },
    end() {
      const d = draft;
      if (!d) return;
      const a = v.toScreen(d.pts[0]);
      const b = v.toScreen(d.pts[d.pts.length - 1]);
      const far = Math.hypot(a.x - b.x, a.y - b.y) > 8;
      if (d.kind === 'angle' && d.pts.length === 2) {
        if (!far) draft = null;
        else v.say(pageText('Now drag from the corner along the second arm.'));
        v.invalidate();
        return;
      }
      draft = null;
      if (d.kind === 'angle') {
        d.text = `${angleOf(d.pts).toFixed(1)}°`;
        marks.push(d);
        v.say(`Angle ${d.text}`);
      } else if ((d.kind === 'polygon' && d.pts.length >= 3) || (d.kind === 'ellipse' && far)) {
        marks.push(d);
        measureRegion(d);
      }
      v.invalidate();
    },
    cancel() { draft = null; },
    clear() { for (let i = marks.length - 1; i >= 0; i -= 1) if (!marks[i].saved) marks.splice(i, 1); draft = null; },
    /** Draw this key's marks into the SVG layer. @param {SVGElement} svg @param {string} key */
    draw(svg, key) {
      const list = marks.filter((m) => m.key === key);
      if (draft && draft.key === key) list.push(draft);
      for (const m of list) {
        const s = m.pts.map(v.toScreen);
        let el;
        if (m.kind === 'ellipse') {
          el = document.createElementNS(SVGNS, 'ellipse');
          el.setAttribute('cx', String((s[0].x + s[1].x) / 2)); el.setAttribute('cy', String((s[0].y + s[1].y) / 2));
          el.setAttribute('rx', String(Math.abs(s[1].x - s[0].x) / 2)); el.setAttribute('ry', String(Math.abs(s[1].y - s[0].y) / 2));
        } else {
          el = document.createElementNS(SVGNS, m.kind === 'polygon' && m !== draft ? 'polygon' : 'polyline');
          el.setAttribute('points', s.map((p) => `${p.x},${p.y}`).join(' '));
        }
        el.setAttribute('class', `shape${m.saved ? ' saved' : ''}`);
        svg.appendChild(el);
        const words = wordsOf(m, s, svg.clientWidth);
        if (words) {
          const text = document.createElementNS(SVGNS, 'text');
          text.setAttribute('x', String(words.x));
          text.setAttribute('y', String(words.y));
          text.setAttribute('class', `value${m.saved ? ' saved' : ''}`);
          words.lines.forEach((line, i) => {
            const span = document.createElementNS(SVGNS, 'tspan');
            span.setAttribute('x', String(words.x));
            if (i) span.setAttribute('dy', String(LINE));
            span.textContent = line;
            text.appendChild(span);
          });
          svg.appendChild(text);
        }
      }
    },
    /**
     * Draw this key's marks into a 2D context in screen (CSS) pixels, as the SVG layer shows
     * them: the saved JPEG (viewer.js saveJpeg). @param {CanvasRenderingContext2D} c
     * @param {string} key @param {number} width the screen's width in CSS pixels
     */
    paint(c, key, width) {
      c.save();
      c.lineWidth = 2; c.lineJoin = 'round'; c.font = '600 14px system-ui, sans-serif';
      for (const m of marks.filter((x) => x.key === key)) {
        const s = m.pts.map(v.toScreen);
        const colour = m.saved ? SAVED : DRAWN;
        c.strokeStyle = colour;
        c.beginPath();
        if (m.kind === 'ellipse') {
          c.ellipse((s[0].x + s[1].x) / 2, (s[0].y + s[1].y) / 2,
            Math.abs(s[1].x - s[0].x) / 2, Math.abs(s[1].y - s[0].y) / 2, 0, 0, 2 * Math.PI);
        } else {
          s.forEach((p, i) => (i ? c.lineTo(p.x, p.y) : c.moveTo(p.x, p.y)));
          if (m.kind === 'polygon') c.closePath();
        }
        c.stroke();
        const words = wordsOf(m, s, width);
        if (!words) continue;
        words.lines.forEach((line, i) => { // black edge under the letters, as paint-order: stroke
          const y = words.y + i * LINE;
          c.strokeStyle = '#000'; c.lineWidth = 3; c.strokeText(line, words.x, y);
          c.fillStyle = colour; c.fillText(line, words.x, y);
        });
        c.lineWidth = 2;
      }
      c.restore();
    },
    /** Save the marks not saved yet (and the viewer's lengths) with the study. */
    async save() {
      const fresh = [...marks.filter((m) => !m.saved), ...v.lengths()];
      const items = [];
      for (const m of fresh) {
        const at = v.frameOf(m.key);
        if (!at) continue;
        items.push({ sop: at[0], frame: at[1], kind: m.kind,
          points: (m.kind === 'ellipse' ? m.pts.slice(0, 2) : m.pts).map(toPixels), text: m.text.slice(0, 64) });
      }
      if (!items.length) { v.say(pageText('Nothing new to save: draw a measurement first.')); return; }
      v.say(pageText('Saving the measurements…'));
      try {
        const answer = await fetch(`/studies/${encodeURIComponent(data.study)}/measurements`, {
          method: 'POST', credentials: 'same-origin',
          headers: { 'Content-Type': 'application/json', 'X-CSRF-Token': csrf },
          body: JSON.stringify({ measurements: items.slice(0, 50) }),
        });
        if (!answer.ok) { v.say(pageText('The measurements could not be saved. Please try again.')); return; }
        for (const m of marks) m.saved = true;
        v.root.dataset.saved = String(items.length);
        v.say(`${items.length} measurement${items.length === 1 ? '' : 's'} saved with the study.`);
        v.invalidate();
      } catch {
        v.say(pageText('No connection: the measurements are not saved yet.'));
      }
    },
    /** Mark the image shown as a key image (a Key Object Selection document of the study). */
    async markKey(/** @type {string} */ key) {
      const at = v.frameOf(key);
      if (!at) { v.say(pageText('Key images are marked on the slices view.')); return; }
      try {
        const answer = await fetch(`/studies/${encodeURIComponent(data.study)}/key-images`, {
          method: 'POST', credentials: 'same-origin',
          headers: { 'Content-Type': 'application/json', 'X-CSRF-Token': csrf },
          body: JSON.stringify({ sop: at[0] }),
        });
        v.say(answer.ok ? 'Marked as a key image: it is shown first to those you share the study with.'
          : 'The image could not be marked. Please try again.');
        if (answer.ok) v.root.dataset.keyMarked = at[0];
      } catch {
        v.say(pageText('No connection: the image is not marked yet.'));
      }
    },
    /** The measurements saved with the study, drawn on this series' images. */
    async load() {
      try {
        const answer = await fetch(`/studies/${encodeURIComponent(data.study)}/series/${encodeURIComponent(data.series)}/measurements`,
          { credentials: 'same-origin' });
        if (!answer.ok) return;
        const body = await answer.json();
        for (const s of body.measurements || []) {
          const key = v.keyOf(s.sop, s.frame);
          if (!key) continue;
          marks.push({ key, kind: s.kind, pts: s.points.map(fromPixels), text: s.text || '', saved: true, author: s.author || '' });
        }
        v.root.dataset.savedShown = String(marks.length);
        // An office manager is not shown others' sets, only told how many there are.
        const note = /** @type {HTMLElement | null} */ (v.root.querySelector('.withheld'));
        if (note && body.withheld > 0) {
          note.textContent = pageText('Saved measurements by others, not shown: %(num)s', { num: number(body.withheld, 0) });
          note.hidden = false;
        }
        v.invalidate();
      } catch { /* offline: the images still show */ }
    },
  };
  return api;
}
