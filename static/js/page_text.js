// The page's words for its scripts (portal/i18n.py JS_STRINGS, docs/i18n.md): the server
// writes them translated into <script type="application/json" id="page-strings">, keyed by
// their English words; a missing one shows in English. "%(name)s" takes values[name].

/** @type {Record<string, string>} */
let strings = {};
try {
  strings = JSON.parse(document.getElementById('page-strings')?.textContent || '{}');
} catch { strings = {}; }

/**
 * @param {string} words the English words (a msgid of JS_STRINGS)
 * @param {Record<string, string | number>} [values]
 */
export function pageText(words, values = {}) {
  return (strings[words] || words)
    .replace(/%\((\w+)\)s/g, (_, key) => String(values[key] ?? ''))
    .replace('%%', '%');
}

/**
 * A number as the page's language writes it (12,5 in German, 12.5 in English).
 * @param {number} value
 * @param {number} digits fraction digits
 */
export function number(value, digits) {
  return new Intl.NumberFormat(document.documentElement.lang || undefined, {
    minimumFractionDigits: digits, maximumFractionDigits: digits, useGrouping: false,
  }).format(value);
}
