// An upload link's landing page: the link code travels in the address's fragment (#code),
// which browsers never send. It moves into the form, leaves the address bar and the history at
// once, and goes nowhere but the form's POST (as the share link's landing page does).
(function () {
  'use strict';
  var field = /** @type {HTMLInputElement} */ (document.getElementById('token'));
  var openBox = document.getElementById('open-box');
  var missing = document.getElementById('no-token');
  if (!field || !openBox || !missing) return;
  var code = window.location.hash.slice(1) || field.value;
  field.value = code;
  if (window.location.hash || window.location.pathname !== openBox.dataset.landing) {
    history.replaceState(null, '', openBox.dataset.landing);
  }
  openBox.hidden = !code;
  missing.hidden = !!code;
})();
