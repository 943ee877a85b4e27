// The share link's landing page. The link code travels in the address's fragment (#code),
// which browsers never send; it is kept in this tab's sessionStorage until the exchange
// succeeds (the pages the exchange leads to remove it), so that a reload, or a phone that
// drops the tab while the patient reads the PIN in another app, still has it. It leaves the
// address bar and the history at once, and goes nowhere but the form's POST.
(function () {
  'use strict';
  var KEY = 'share-link-code';
  // The page's words (portal/i18n.py JS_STRINGS; static/js/page_text.js for modules).
  var pageStrings = {};
  try { pageStrings = JSON.parse((document.getElementById('page-strings') || {}).textContent || '{}'); } catch (e) { pageStrings = {}; }
  /** @param {string} words @param {Record<string, string | number>} [values] */
  function pageText(words, values) {
    return (pageStrings[words] || words).replace(/%\((\w+)\)s/g, function (_, key) {
      return String((values || {})[key] == null ? '' : (values || {})[key]);
    }).replace('%%', '%');
  }
  var field = /** @type {HTMLInputElement} */ (document.getElementById('token'));
  var openBox = document.getElementById('open-box');
  var missing = document.getElementById('no-token');
  if (!field || !openBox || !missing) return;

  /** Read or write sessionStorage; a browser that refuses it (private mode) just forgets. */
  function stored(value) {
    try {
      if (value === undefined) return window.sessionStorage.getItem(KEY) || '';
      if (value) window.sessionStorage.setItem(KEY, value);
      else window.sessionStorage.removeItem(KEY);
    } catch (e) { /* storage unavailable: the code lives only in this page */ }
    return '';
  }

  // A link just opened wins over a code kept from an earlier one; the server's answer to a
  // wrong PIN carries the code in the form (that tab may have lost its storage meanwhile).
  var code = window.location.hash.slice(1) || field.value || stored();
  field.value = code;
  if (code) stored(code);
  // Leave the code out of the address and the history. On the answer to a wrong PIN this also
  // turns the entry into a plain GET of /s, so a reload does not send the PIN again.
  if (window.location.hash || window.location.pathname !== openBox.dataset.landing) {
    history.replaceState(null, '', openBox.dataset.landing);
  }
  // Exactly one of the two: the PIN form, or the note that the code is missing.
  openBox.hidden = !code;
  missing.hidden = !!code;
  if (code) {
    var form = openBox.querySelector('form');
    var button = form && form.querySelector('button[type=submit]');
    if (form && button) {
      form.addEventListener('submit', function () {
        // One press, one attempt: a second tap while the page loads would count as another.
        window.setTimeout(function () { button.disabled = true; }, 0);
        button.textContent = pageText('Opening…');
      });
      // Back to this page from the browser's cache: the button works again.
      window.addEventListener('pageshow', function () {
        button.disabled = false;
        button.textContent = pageText('Show my images');
      });
    }
  }
})();
