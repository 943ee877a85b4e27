// Installs the app shell's service worker (static files and the offline page only).
const script = document.currentScript;
if ('serviceWorker' in navigator && script && window.isSecureContext) {
  navigator.serviceWorker.register(script.dataset.worker, { scope: script.dataset.scope })
    .catch(() => {}); // without it the portal works as before, only less well offline
}
// The offline page (static/offline.html) speaks the language of the last page shown here.
try {
  window.localStorage.setItem('portal-page-lang', document.documentElement.lang || 'en');
} catch (e) { /* storage refused: the offline page follows the browser's language */ }
