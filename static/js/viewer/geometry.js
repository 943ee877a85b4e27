// Small pure helpers: rendition widths, orientation letters, window approximation, distances.

/**
 * The allow-listed width to ask for: enough device pixels for the screen, never more than
 * the image has (the server never enlarges), rounding down when within 20 %.
 * @param {number} needed device pixels across the image on screen
 * @param {number} native the image's own width in pixels
 * @param {number[]} widths allow-listed widths, ascending
 */
export function pickWidth(needed, native, widths) {
  const target = Math.min(needed, native || needed);
  for (const w of widths) if (w >= target * 0.8) return w;
  return widths[widths.length - 1];
}

const LETTERS = [['R', 'L'], ['A', 'P'], ['F', 'H']];

/**
 * Patient direction letters for a direction in the patient coordinate system (LPS),
 * strongest component first (PS3.3 C.7.6.1.1.1), e.g. [0.9, 0, -0.4] gives "LF".
 * @param {number[]} v
 */
export function directionLetters(v) {
  const parts = [0, 1, 2]
    .filter((i) => Math.abs(v[i]) > 0.25)
    .sort((a, b) => Math.abs(v[b]) - Math.abs(v[a]))
    .map((i) => LETTERS[i][v[i] > 0 ? 1 : 0]);
  return parts.slice(0, 2).join('');
}

/** @param {number[]} v */
const negate = (v) => v.map((x) => -x);

/**
 * Orientation markers {top, right, bottom, left} for a view.
 * @param {number[] | null} orientation ImageOrientationPatient (row then column cosines)
 * @param {string} view 'stack' | 'axial' | 'coronal' | 'sagittal' | 'mip'
 * @param {number} angle MIP angle in degrees
 */
export function markers(orientation, view, angle = 0) {
  if (!orientation) return { top: '', right: '', bottom: '', left: '' };
  const row = orientation.slice(0, 3);
  const col = orientation.slice(3, 6);
  const normal = [row[1] * col[2] - row[2] * col[1], row[2] * col[0] - row[0] * col[2],
    row[0] * col[1] - row[1] * col[0]];
  let across = row;
  let down = col;
  if (view === 'coronal' || view === 'mip') {
    across = row;
    down = negate(normal);
  } else if (view === 'sagittal') {
    across = col;
    down = negate(normal);
  }
  const out = {
    top: directionLetters(negate(down)), bottom: directionLetters(down),
    left: directionLetters(negate(across)), right: directionLetters(across),
  };
  if (view === 'mip' && angle === 180) {
    [out.left, out.right] = [out.right, out.left]; // seen from behind
  } else if (view === 'mip' && angle % 180 !== 0) {
    out.left = '';
    out.right = '';
  }
  return out;
}

/**
 * Slope and intercept that turn pixels rendered with window `from` into (nearly) what the
 * server renders with window `to`: both are linear ramps (PS3.3 C.11.2.1.2.1), so one maps
 * onto the other exactly where the first did not clip.
 * @param {{center: number, width: number}} from
 * @param {{center: number, width: number}} to
 * @param {boolean} invert
 */
export function windowMap(from, to, invert) {
  let slope = from.width / to.width;
  let intercept = (from.center - to.center) / to.width + (to.width - from.width) / (2 * to.width);
  if (invert) {
    slope = -slope;
    intercept = 1 - intercept;
  }
  return { slope, intercept };
}

/**
 * Length of a segment in mm, or null without spacing.
 * @param {{x: number, y: number}} a image-space point (x across 0..1, y down 0..aspect)
 * @param {{x: number, y: number}} b
 * @param {{across: number, down: number} | null} field mm covered by 1 unit of x and of y
 */
export function lengthMm(a, b, field) {
  if (!field) return null;
  const dx = (b.x - a.x) * field.across;
  const dy = (b.y - a.y) * field.down;
  return Math.hypot(dx, dy);
}

/** @param {number} value @param {number} low @param {number} high */
export const clamp = (value, low, high) => Math.min(high, Math.max(low, value));
