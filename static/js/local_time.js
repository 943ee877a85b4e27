// Times written by the server in UTC (<time datetime="...Z" data-local>) are shown in the
// reader's own time zone and language; without JavaScript the UTC text stays.
(function () {
  'use strict';
  var format = new Intl.DateTimeFormat(document.documentElement.lang || undefined, {
    weekday: 'short', day: 'numeric', month: 'short', year: 'numeric',
    hour: '2-digit', minute: '2-digit', timeZoneName: 'short',
  });
  /** @param {ParentNode} root */
  function localise(root) {
    root.querySelectorAll('time[data-local]').forEach(function (el) {
      var when = new Date(el.getAttribute('datetime') || '');
      if (!isNaN(when.getTime())) el.textContent = format.format(when);
    });
  }
  localise(document);
  window.localTimes = localise; // pages that write times later (the share form's expiry) call it
})();
