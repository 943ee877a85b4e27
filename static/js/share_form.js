// The share form: shows only the questions that apply, writes the expiry in the doctor's own
// time, and keeps the choices in this tab while a fresh sign-in (or an ended session) takes
// the doctor to the identity provider and back. The link-made page forgets the draft.
(function () {
  'use strict';
  // The page's words (portal/i18n.py JS_STRINGS; static/js/page_text.js for modules).
  var pageStrings = {};
  try { pageStrings = JSON.parse((document.getElementById('page-strings') || {}).textContent || '{}'); } catch (e) { pageStrings = {}; }
  /** @param {string} words @param {Record<string, string | number>} [values] */
  function pageText(words, values) {
    return (pageStrings[words] || words).replace(/%\((\w+)\)s/g, function (_, key) {
      return String((values || {})[key] == null ? '' : (values || {})[key]);
    }).replace('%%', '%');
  }
  var form = /** @type {HTMLFormElement | null} */ (document.getElementById('share-form'));
  if (!form) return;
  var draftKey = form.dataset.draft || 'share-draft';
  var DRAFT_MINUTES = 120; // older choices are not brought back: the doctor has moved on

  /** @param {string} name */
  function chosen(name) {
    var input = /** @type {HTMLInputElement | null} */ (form.querySelector('input[name="' + name + '"]:checked'));
    return input ? input.value : '';
  }

  /** Show a dependent question only while its answer matters. */
  function update() {
    var way = document.getElementById('colleague-way');
    if (way) way.hidden = chosen('audience') !== 'physician';
    var series = document.getElementById('series-choice');
    if (series) series.hidden = chosen('scope') !== 'series';
    var days = /** @type {HTMLInputElement} */ (form.querySelector('input[name=days]'));
    var hint = document.getElementById('expiry-hint');
    var n = Number(days.value);
    if (hint) {
      if (days.value && Number.isInteger(n) && n >= 1 && n <= Number(days.max)) {
        var until = new Date(Date.now() + n * 86400000);
        hint.textContent = pageText('The link will work until %(when)s.', {
          when: new Intl.DateTimeFormat(document.documentElement.lang || undefined, {
            weekday: 'short', day: 'numeric', month: 'short', year: 'numeric',
            hour: '2-digit', minute: '2-digit', timeZoneName: 'short',
          }).format(until)});
      } else {
        hint.textContent = '';
      }
    }
  }

  function save() {
    var fields = [];
    for (var i = 0; i < form.elements.length; i += 1) {
      var el = /** @type {HTMLInputElement} */ (form.elements[i]);
      if (!el.name || el.name === 'csrf_token' || el.type === 'submit') continue;
      if (el.type === 'radio' || el.type === 'checkbox') fields.push([el.name, el.value, el.checked]);
      else fields.push([el.name, el.value, null]);
    }
    try {
      sessionStorage.setItem(draftKey, JSON.stringify({ at: Date.now(), fields: fields }));
    } catch (e) { /* no storage: the form simply starts afresh */ }
  }

  function restore() {
    var draft;
    try { draft = JSON.parse(sessionStorage.getItem(draftKey) || 'null'); } catch (e) { draft = null; }
    if (!draft || !Array.isArray(draft.fields) || Date.now() - draft.at > DRAFT_MINUTES * 60000) return;
    draft.fields.forEach(function (/** @type {[string, string, boolean | null]} */ f) {
      var selector = 'input[name="' + CSS.escape(f[0]) + '"]';
      if (f[2] === null) {
        // Text, number, the note's textarea and the message's language (a select).
        var field = /** @type {HTMLInputElement | null} */ (
          form.querySelector('[name="' + CSS.escape(f[0]) + '"]:not([type=radio]):not([type=checkbox])'));
        if (field) field.value = f[1];
        return;
      }
      // By the value property: a checkbox without a value attribute has the value "on".
      form.querySelectorAll(selector).forEach(function (/** @type {Element} */ el) {
        var box = /** @type {HTMLInputElement} */ (el);
        if (box.value === f[1]) box.checked = /** @type {boolean} */ (f[2]);
      });
    });
    var kept = document.getElementById('draft-kept');
    if (kept) kept.hidden = false;
  }

  restore();
  update();
  form.addEventListener('change', update);
  form.addEventListener('input', update);
  form.addEventListener('submit', save);
})();
