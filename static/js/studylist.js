// Older studies load as the list scrolls. Without JavaScript the "Older" link pages instead.
// Rows come from the server's own escaped HTML of the next page; nothing is built from text.

import { pageText } from './page_text.js';

const rows = document.getElementById('study-rows');
let pager = document.getElementById('pager');

/** @param {HTMLAnchorElement} link */
async function loadMore(link) {
  link.setAttribute('aria-busy', 'true');
  link.textContent = pageText('Loading…');
  try {
    const response = await fetch(link.href, { headers: { Accept: 'text/html' }, credentials: 'same-origin' });
    if (!response.ok) throw new Error(String(response.status));
    const page = new DOMParser().parseFromString(await response.text(), 'text/html');
    const more = page.getElementById('study-rows');
    const next = page.getElementById('pager');
    if (!rows || !more || !next || !pager) throw new Error('unexpected page');
    for (const item of [...more.children]) rows.appendChild(document.adoptNode(item));
    next.querySelector('a[rel=prev]')?.replaceWith(document.createElement('span'));
    pager.replaceWith(document.adoptNode(next));
    pager = next;
    watch();
  } catch {
    link.removeAttribute('aria-busy');
    link.textContent = pageText('Older');
  }
}

const observer = 'IntersectionObserver' in window ? new IntersectionObserver((entries) => {
  for (const entry of entries) {
    if (entry.isIntersecting) {
      observer?.unobserve(entry.target);
      loadMore(/** @type {HTMLAnchorElement} */ (entry.target));
    }
  }
}, { rootMargin: '400px 0px' }) : null;

function watch() {
  const next = pager?.querySelector('a[rel=next]');
  if (next && observer) observer.observe(next);
}

watch();
