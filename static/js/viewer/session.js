// When images stop loading because the session has ended, the viewer says so (instead of a
// black screen) and offers to sign in again, coming back to the same series, image and view.

/**
 * Ask once more for a URL that failed: a 401 (or a redirect to the sign-in) means the session
 * has ended; anything else, or no network at all, is not a session matter.
 * @param {string} url
 * @returns {Promise<boolean>}
 */
export async function sessionEnded(url) {
  try {
    const answer = await fetch(url, { cache: 'no-store', credentials: 'same-origin', redirect: 'manual' });
    return answer.status === 401 || answer.type === 'opaqueredirect';
  } catch {
    return false;
  }
}

/**
 * Show the "session ended" dialog of the page; its "Sign in again" returns to ``back``.
 * @param {string} back a path of this site (the viewer with its image and view)
 */
export function showSessionEnded(back) {
  const box = /** @type {HTMLElement | null} */ (document.getElementById('session-ended'));
  if (!box || !box.hidden) return;
  const again = /** @type {HTMLAnchorElement | null} */ (box.querySelector('a[data-sign-in]'));
  if (again) again.href = `${again.pathname}?next=${encodeURIComponent(back)}`;
  box.hidden = false;
  document.body.classList.add('session-over');
  /** @type {HTMLElement | null} */ (box.querySelector('a, button') || box).focus();
}
