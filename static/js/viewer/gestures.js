// Pointer Events to viewer actions: one finger or the mouse drags (slices, window, angle or
// a measurement, depending on the tool), two fingers pinch and pan, a double tap toggles
// fit / 1:1, a quick flick keeps scrolling. The wheel scrolls slices (with Ctrl: zooms).

/**
 * @typedef {object} GestureHandlers
 * @property {(x: number, y: number, e: PointerEvent) => void} dragStart
 * @property {(dx: number, dy: number, x: number, y: number, e: PointerEvent) => void} drag
 * @property {(vx: number, vy: number) => void} dragEnd  velocity in px/ms at release
 * @property {(factor: number, cx: number, cy: number, dx: number, dy: number) => void} pinch
 * @property {(x: number, y: number) => void} doubleTap
 * @property {(steps: number) => void} wheelSlices
 * @property {(factor: number, x: number, y: number) => void} wheelZoom
 * @property {() => void} [cancel]
 */

/**
 * @param {HTMLElement} element
 * @param {GestureHandlers} on
 */
export function attachGestures(element, on) {
  /** @type {Map<number, {x: number, y: number}>} */
  const points = new Map();
  let dragging = false;
  let pinching = false;
  let last = { x: 0, y: 0, t: 0 };
  let velocity = { x: 0, y: 0 };
  let lastTap = { t: 0, x: 0, y: 0 };
  let moved = 0;
  let wheelRest = 0;

  const local = (/** @type {PointerEvent | WheelEvent} */ e) => {
    const box = element.getBoundingClientRect();
    return { x: e.clientX - box.left, y: e.clientY - box.top };
  };

  const pair = () => {
    const [a, b] = [...points.values()];
    return { cx: (a.x + b.x) / 2, cy: (a.y + b.y) / 2, d: Math.hypot(a.x - b.x, a.y - b.y) };
  };
  let before = { cx: 0, cy: 0, d: 1 };

  element.addEventListener('pointerdown', (e) => {
    if (e.pointerType === 'mouse' && e.button !== 0) return;
    element.setPointerCapture(e.pointerId);
    const p = local(e);
    points.set(e.pointerId, p);
    if (points.size === 1) {
      dragging = true;
      moved = 0;
      last = { x: p.x, y: p.y, t: e.timeStamp };
      velocity = { x: 0, y: 0 };
      on.dragStart(p.x, p.y, e);
    } else if (points.size === 2) {
      if (dragging && on.cancel) on.cancel();
      dragging = false;
      pinching = true;
      before = pair();
    }
    e.preventDefault();
  });

  element.addEventListener('pointermove', (e) => {
    if (!points.has(e.pointerId)) return;
    const p = local(e);
    points.set(e.pointerId, p);
    if (pinching && points.size === 2) {
      const now = pair();
      on.pinch(now.d / Math.max(before.d, 1), now.cx, now.cy, now.cx - before.cx, now.cy - before.cy);
      before = now;
    } else if (dragging) {
      const dx = p.x - last.x;
      const dy = p.y - last.y;
      const dt = Math.max(e.timeStamp - last.t, 1);
      moved += Math.abs(dx) + Math.abs(dy);
      velocity = { x: 0.7 * (dx / dt) + 0.3 * velocity.x, y: 0.7 * (dy / dt) + 0.3 * velocity.y };
      last = { x: p.x, y: p.y, t: e.timeStamp };
      on.drag(dx, dy, p.x, p.y, e);
    }
  });

  const end = (/** @type {PointerEvent} */ e) => {
    if (!points.has(e.pointerId)) return;
    const p = local(e);
    points.delete(e.pointerId);
    if (pinching) {
      if (points.size < 2) pinching = false;
      return; // lifting one finger of a pinch neither drags nor taps
    }
    if (!dragging) return;
    dragging = false;
    const still = e.timeStamp - last.t > 80;
    on.dragEnd(still ? 0 : velocity.x, still ? 0 : velocity.y);
    if (moved < 10 && e.type === 'pointerup') {
      if (e.timeStamp - lastTap.t < 320 && Math.hypot(p.x - lastTap.x, p.y - lastTap.y) < 30) {
        on.doubleTap(p.x, p.y);
        lastTap = { t: 0, x: 0, y: 0 };
      } else {
        lastTap = { t: e.timeStamp, x: p.x, y: p.y };
      }
    }
  };
  element.addEventListener('pointerup', end);
  element.addEventListener('pointercancel', end);

  element.addEventListener('wheel', (e) => {
    e.preventDefault();
    const p = local(e);
    if (e.ctrlKey) {
      on.wheelZoom(Math.exp(-e.deltaY / 300), p.x, p.y);
      return;
    }
    // Line-based wheels send 3 lines, trackpads many small pixel deltas: both become slices.
    const delta = e.deltaMode === 1 ? e.deltaY * 33 : e.deltaY;
    wheelRest += delta;
    const steps = Math.trunc(wheelRest / 50);
    if (steps) {
      wheelRest -= steps * 50;
      on.wheelSlices(steps);
    }
  }, { passive: false });

}
