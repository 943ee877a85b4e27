// The offline page (static/offline.html, shown by the service worker without a network) in
// the language of the last page this browser showed (static/js/shell.js keeps its <html lang>),
// else the browser's own language, else English. Its words are the page's JSON data block.
(function () {
  'use strict';
  var words = {};
  try { words = JSON.parse((document.getElementById('offline-words') || {}).textContent || '{}'); } catch (e) { words = {}; }
  var wanted = [];
  try { wanted.push(window.localStorage.getItem('portal-page-lang') || ''); } catch (e) { /* no storage */ }
  wanted = wanted.concat(navigator.languages || [navigator.language || '']);
  var code = 'en';
  for (var i = 0; i < wanted.length; i += 1) {
    var base = String(wanted[i] || '').toLowerCase().split('-')[0];
    if (base && Object.prototype.hasOwnProperty.call(words, base)) { code = base; break; }
  }
  var chosen = words[code];
  if (!chosen) return;
  document.documentElement.lang = code;
  if (chosen.title) document.title = chosen.title;
  var parts = document.querySelectorAll('[data-word]');
  for (var j = 0; j < parts.length; j += 1) {
    var text = chosen[parts[j].getAttribute('data-word')];
    if (text) parts[j].textContent = text;
  }
})();
