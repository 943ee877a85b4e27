// The office-manager console: results appear as people type, and what they tick stays chosen.
// Results come from the server's own escaped HTML of the same page; nothing is built from text.
(function () {
  'use strict';
  /** @type {Map<HTMLFormElement, number>} */
  const timers = new Map();

  /** @param {HTMLFormElement} form */
  async function refresh(form) {
    const target = form.getAttribute('data-live') || '';
    const region = document.querySelector(target);
    if (!region) return;
    const url = new URL(form.action || window.location.href, window.location.href);
    url.search = new URLSearchParams(/** @type {any} */ (new FormData(form))).toString();
    region.setAttribute('aria-busy', 'true');
    try {
      const response = await fetch(url, { headers: { Accept: 'text/html' }, credentials: 'same-origin' });
      if (!response.ok) return;
      const page = new DOMParser().parseFromString(await response.text(), 'text/html');
      const fresh = page.querySelector(target);
      if (fresh) {
        region.replaceChildren(...[...fresh.childNodes].map((n) => document.adoptNode(n)));
        if (window.localTimes) window.localTimes(region);
        history.replaceState(null, '', url);
      }
    } finally {
      region.removeAttribute('aria-busy');
    }
  }

  document.querySelectorAll('form[data-live]').forEach((node) => {
    const form = /** @type {HTMLFormElement} */ (node);
    form.addEventListener('input', () => {
      clearTimeout(timers.get(form));
      timers.set(form, window.setTimeout(() => refresh(form), 250));
    });
    form.addEventListener('submit', (event) => {
      event.preventDefault();
      clearTimeout(timers.get(form));
      refresh(form);
    });
  });

  // A ticked search result moves into the chosen list, so a new search does not lose it.
  document.addEventListener('change', (event) => {
    const input = /** @type {HTMLInputElement} */ (event.target);
    const into = input.getAttribute && input.getAttribute('data-pick');
    if (!into || !input.checked) return;
    const list = document.querySelector(into);
    const item = input.closest('li');
    if (!list || !item) return;
    if (input.type === 'radio') {
      list.querySelectorAll(`input[name="${input.name}"]`).forEach((other) => other.closest('li')?.remove());
    }
    input.removeAttribute('data-pick');
    item.classList.add('picked');
    list.appendChild(item);
  });
})();
