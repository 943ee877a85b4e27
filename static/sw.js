// The app shell's service worker: it keeps static files (CSS, JS, icons) and an offline page,
// never an answer from /studies, /dicomweb, /api or any other page, which may carry patient
// data. Hashed URLs (?v=...) never change, so they are served from the cache first.
const CACHE = 'portal-shell-2';
const BASE = new URL('./', self.location).pathname; // the static folder, e.g. /static/
const OFFLINE = `${BASE}offline.html`;
// The offline page holds the words of every language; its script picks the page's (it reads
// the language the last page was in, docs/i18n.md).
const SHELL = [OFFLINE, `${BASE}js/offline.js`, `${BASE}css/portal.css`,
  `${BASE}icons/icon-192.png`];
const DOWNLOADS = /\.(zip|pdf|csv)$/; // streamed to disk: left to the browser

self.addEventListener('install', (event) => {
  event.waitUntil(caches.open(CACHE)
    .then((cache) => cache.addAll(SHELL.map((url) => new Request(url, { cache: 'reload' }))))
    .then(() => self.skipWaiting()));
});

self.addEventListener('activate', (event) => {
  event.waitUntil((async () => {
    const names = await caches.keys();
    await Promise.all(names.filter((name) => name !== CACHE).map((name) => caches.delete(name)));
    if (self.registration.navigationPreload) await self.registration.navigationPreload.enable();
    await self.clients.claim();
  })());
});

function isShell(url) {
  return url.origin === self.location.origin && url.pathname.startsWith(BASE)
    && url.pathname !== `${BASE}sw.js`;
}

async function keep(cache, request, response) {
  // Only whole, same-origin answers; an older version of the same file is dropped.
  if (!response.ok || response.type !== 'basic' || response.status !== 200) return;
  for (const old of await cache.keys(request, { ignoreSearch: true })) {
    if (old.url !== request.url) await cache.delete(old);
  }
  await cache.put(request, response);
}

async function cacheFirst(request) {
  const cache = await caches.open(CACHE);
  const hit = await cache.match(request);
  if (hit) return hit;
  try {
    const response = await fetch(request);
    await keep(cache, request, response.clone());
    return response;
  } catch (error) {
    // No network: another version of the same file beats none (the offline page's own).
    const other = await cache.match(request, { ignoreSearch: true });
    if (other) return other;
    throw error;
  }
}

async function networkFirst(request) {
  const cache = await caches.open(CACHE);
  try {
    const response = await fetch(request);
    await keep(cache, request, response.clone());
    return response;
  } catch (error) {
    const hit = await cache.match(request, { ignoreSearch: true });
    if (hit) return hit;
    throw error;
  }
}

async function page(event) {
  // Pages go to the network and are never stored; without a network, the offline page.
  try {
    const preloaded = await event.preloadResponse;
    return preloaded || await fetch(event.request);
  } catch (error) {
    const offline = await caches.match(OFFLINE);
    if (offline) return offline;
    throw error;
  }
}

self.addEventListener('fetch', (event) => {
  const { request } = event;
  if (request.method !== 'GET') return;
  const url = new URL(request.url);
  if (isShell(url)) {
    event.respondWith(url.searchParams.has('v') ? cacheFirst(request) : networkFirst(request));
  } else if (request.mode === 'navigate' && url.origin === self.location.origin
             && !DOWNLOADS.test(url.pathname)) {
    event.respondWith(page(event));
  }
});
