// The page of a link just made: Copy, the phone's own share sheet where there is one, and
// printing the QR code or the PIN as a slip of its own. The share form's draft is done with.
(function () {
  'use strict';
  try {
    for (var i = sessionStorage.length - 1; i >= 0; i -= 1) {
      var key = sessionStorage.key(i);
      if (key && key.indexOf('share-draft') === 0) sessionStorage.removeItem(key);
    }
  } catch (e) { /* no storage */ }

  var field = /** @type {HTMLInputElement} */ (document.getElementById('share-url'));
  var status = document.getElementById('copy-status');
  /** @param {string} text */
  function tell(text) { if (status) status.textContent = text; }

  var copy = document.getElementById('copy');
  if (copy) {
    copy.addEventListener('click', function () {
      field.select();
      var done = function () { tell('The link is copied.'); };
      if (navigator.clipboard) {
        navigator.clipboard.writeText(field.value).then(done, function () {
          tell('Copying was refused: select the link and copy it yourself.');
        });
      } else if (document.execCommand('copy')) {
        done();
      }
    });
  }

  // Only the link goes into the share sheet: the PIN travels another way.
  var share = document.getElementById('native-share');
  if (share && typeof navigator.share === 'function') {
    share.hidden = false;
    share.addEventListener('click', function () {
      navigator.share({ title: 'Images shared with you', url: field.value }).then(function () {
        tell('The link was handed to the app you chose.');
      }, function (/** @type {Error} */ error) {
        if (error && error.name !== 'AbortError') tell('Sharing did not work: copy the link instead.');
      });
    });
  }

  document.querySelectorAll('button[data-print]').forEach(function (button) {
    button.addEventListener('click', function () {
      document.body.dataset.print = /** @type {HTMLElement} */ (button).dataset.print || '';
      window.print();
    });
  });
  window.addEventListener('afterprint', function () { delete document.body.dataset.print; });
})();
