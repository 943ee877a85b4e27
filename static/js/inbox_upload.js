// The upload inbox: files, folders (a CD) or ZIPs, by picker or drag and drop, sent in chunks.
// Each file is announced (POST), then sent piece by piece with Content-Range (PUT). When the
// connection drops, the page waits until the browser is online again, asks the server how much
// of the file it has (GET) and sends the rest from there. The answer to a file's last piece
// lists what became of it (kept, refused with the reason, skipped) in plain words.
(function () {
  'use strict';
  var CHUNK = 256 * 1024;
  // The page's words (portal/i18n.py JS_STRINGS; static/js/page_text.js for modules).
  var pageStrings = {};
  try { pageStrings = JSON.parse((document.getElementById('page-strings') || {}).textContent || '{}'); } catch (e) { pageStrings = {}; }
  /** @param {string} words @param {Record<string, string | number>} [values] */
  function pageText(words, values) {
    return (pageStrings[words] || words).replace(/%\((\w+)\)s/g, function (_, key) {
      return String((values || {})[key] == null ? '' : (values || {})[key]);
    }).replace('%%', '%');
  }
  var box = document.getElementById('uploader');
  var panel = document.getElementById('progress');
  var list = document.getElementById('files');
  var totalBar = /** @type {HTMLProgressElement} */ (document.getElementById('total'));
  var totalLine = document.getElementById('total-line');
  var network = document.getElementById('network');
  if (!box || !panel || !list || !totalBar || !totalLine || !network) return;
  var api = box.dataset.api || '';
  var csrf = box.dataset.csrf || '';
  /** @type {Array<{file: File, name: string, sent: number, row: HTMLElement, bar: HTMLProgressElement, note: HTMLElement}>} */
  var queue = [];
  var running = false;
  var counts = {kept: 0, refused: 0, skipped: 0};
  var finished = false;

  function headers(extra) {
    var h = {'Accept': 'application/json'};
    if (csrf) h['X-CSRF-Token'] = csrf;
    for (var k in extra) h[k] = extra[k];
    return h;
  }

  function sleep(ms) { return new Promise(function (r) { setTimeout(r, ms); }); }

  function whenOnline() {
    if (navigator.onLine) return sleep(1000);
    return new Promise(function (resolve) {
      window.addEventListener('online', function () { resolve(undefined); }, {once: true});
    });
  }

  function showTotal() {
    var size = 0, sent = 0;
    queue.forEach(function (item) { size += item.file.size; sent += item.sent; });
    totalBar.value = size ? Math.floor(sent * 100 / size) : 100;
    var done = queue.filter(function (i) { return i.row.dataset.state === 'done'; }).length;
    var values = {done: done, all: queue.length, kept: counts.kept, refused: counts.refused,
                  skipped: counts.skipped};
    totalLine.textContent = finished
      ? pageText('All files sent (%(all)s) · images kept: %(kept)s, refused: %(refused)s, skipped: %(skipped)s', values)
      : pageText('Files sent: %(done)s of %(all)s · images kept: %(kept)s, refused: %(refused)s, skipped: %(skipped)s', values);
  }

  function add(file, name) {
    var row = document.createElement('li');
    row.className = 'upload-file';
    row.dataset.state = 'waiting';
    var label = document.createElement('span');
    label.className = 'name';
    label.textContent = name;
    var bar = document.createElement('progress');
    bar.max = 100; bar.value = 0;
    bar.setAttribute('aria-label', name);
    var note = document.createElement('span');
    note.className = 'meta';
    note.textContent = pageText('waiting');
    row.append(label, bar, note);
    list.append(row);
    queue.push({file: file, name: name, sent: 0, row: row, bar: bar, note: note});
  }

  function results(item, answer) {
    var lines = answer.results || [];
    lines.forEach(function (r) { counts[r.outcome] = (counts[r.outcome] || 0) + 1; });
    var refused = lines.filter(function (r) { return r.outcome === 'refused'; });
    var kept = lines.filter(function (r) { return r.outcome === 'kept'; }).length;
    var skipped = lines.filter(function (r) { return r.outcome === 'skipped'; });
    item.row.dataset.state = 'done';
    item.row.dataset.outcome = refused.length ? 'refused' : (kept ? 'kept' : 'skipped');
    item.note.textContent = refused.length === 0 ? (kept ? pageText('received, waits for the practice')
      : pageText('not needed: %(reason)s', {reason: skipped[0] ? skipped[0].reason : pageText('nothing to keep')})) : '';
    if (refused.length) {
      var ul = document.createElement('ul');
      ul.className = 'refusals';
      refused.slice(0, 50).forEach(function (r) {
        var li = document.createElement('li');
        li.textContent = lines.length > 1 ? pageText('%(name)s: %(reason)s', {name: r.name, reason: r.reason})
          : pageText('Refused: %(reason)s', {reason: r.reason});
        ul.append(li);
      });
      if (kept) item.note.textContent = pageText('Images received: %(num)s; refused:', {num: kept});
      item.row.append(ul);
    }
  }

  async function request(method, url, body, extra) {
    // Network errors (offline, a dropped connection) are retried here, for ever, once the
    // browser is online again; HTTP answers go back to the caller.
    for (;;) {
      try {
        var answer = await fetch(url, {method: method, body: body, headers: headers(extra),
                                       credentials: 'same-origin'});
        network.hidden = true;
        return answer;
      } catch (e) {
        network.hidden = false;
        await whenOnline();
      }
    }
  }

  async function failText(answer) {
    // message: the reason in the page's language; error: the same in English (the API's).
    try { var body = await answer.json(); return body.message || body.error || answer.statusText; }
    catch (e) { return answer.statusText || ('error ' + answer.status); }
  }

  async function send(item) {
    item.row.dataset.state = 'sending';
    item.note.textContent = pageText('sending');
    var made = await request('POST', api, JSON.stringify({name: item.name, size: item.file.size}),
                             {'Content-Type': 'application/json'});
    if (made.status !== 201) {
      item.row.dataset.state = 'done';
      item.row.dataset.outcome = 'refused';
      counts.refused += 1;
      item.note.textContent = pageText('Refused: %(reason)s', { reason: await failText(made) });
      return;
    }
    var info = await made.json();
    var url = api + '/' + encodeURIComponent(info.id);
    var chunk = Math.min(CHUNK, info.chunk || CHUNK);
    for (;;) {
      if (item.sent >= item.file.size) {
        // Every byte arrived but no outcome came back: the server is checking the file, or
        // the request that was to check it ended on the way. Wait, ask, and ask it to check.
        item.note.textContent = pageText('checking');
        await sleep(1500);
        var status = await request('GET', url, undefined, {});
        var now = await status.json();
        if (now.state !== 'receiving') { results(item, now); return; }
        item.sent = now.received;
        if (item.sent >= item.file.size) {
          var check = await request('PUT', url, new Blob([]), {
            'Content-Type': 'application/octet-stream',
            'Content-Range': 'bytes */' + item.file.size});
          if (check.ok) {
            var checked = await check.json();
            if (checked.state !== 'receiving') { results(item, checked); return; }
          }
        }
        continue;
      }
      var end = Math.min(item.sent + chunk, item.file.size);
      var answer = await request('PUT', url, item.file.slice(item.sent, end), {
        'Content-Type': 'application/octet-stream',
        'Content-Range': 'bytes ' + item.sent + '-' + (end - 1) + '/' + item.file.size});
      if (answer.status === 409 || answer.status >= 500) {
        // The server has another length (a piece was lost on the way): ask, then go on.
        if (answer.status >= 500) await sleep(2000);
        var asked = await request('GET', url, undefined, {});
        if (!asked.ok) { item.note.textContent = pageText('Refused: %(reason)s', { reason: await failText(asked) }); return; }
        var state = await asked.json();
        if (state.state !== 'receiving') { results(item, state); return; }
        item.sent = state.received;
        continue;
      }
      if (!answer.ok) {
        item.row.dataset.state = 'done';
        item.row.dataset.outcome = 'refused';
        counts.refused += 1;
        item.note.textContent = pageText('Refused: %(reason)s', { reason: await failText(answer) });
        return;
      }
      var body = await answer.json();
      item.sent = body.received;
      item.bar.value = Math.floor(item.sent * 100 / item.file.size);
      showTotal();
      if (body.state !== 'receiving') { results(item, body); return; }
    }
  }

  async function run() {
    if (running) return;
    running = true;
    try {
      for (var i = 0; i < queue.length; i++) {
        if (queue[i].row.dataset.state === 'waiting') {
          await send(queue[i]);
          queue[i].bar.value = 100;
          queue[i].sent = queue[i].file.size;
          showTotal();
        }
      }
      finished = true;
      showTotal();
    } finally {
      running = false;
    }
  }

  function start(files) {
    if (!files.length) return;
    finished = false;
    panel.hidden = false;
    files.forEach(function (f) { add(f.file, f.name); });
    showTotal();
    run();
  }

  function fromInput(input) {
    input.addEventListener('change', function () {
      var files = Array.prototype.map.call(input.files || [], function (f) {
        return {file: f, name: f.webkitRelativePath || f.name};
      });
      input.value = '';
      start(files);
    });
  }
  fromInput(/** @type {HTMLInputElement} */ (document.getElementById('pick-files')));
  fromInput(/** @type {HTMLInputElement} */ (document.getElementById('pick-folder')));

  // Drag and drop: folders are walked through the entries API (a dropped CD folder).
  function walk(entry, path, out) {
    return new Promise(function (resolve) {
      if (entry.isFile) {
        entry.file(function (f) { out.push({file: f, name: path + f.name}); resolve(undefined); },
                   function () { resolve(undefined); });
      } else if (entry.isDirectory) {
        var reader = entry.createReader();
        var all = [];
        var more = function () {
          reader.readEntries(async function (batch) {
            if (!batch.length) {
              for (var i = 0; i < all.length; i++) await walk(all[i], path + entry.name + '/', out);
              resolve(undefined);
            } else { all = all.concat(batch); more(); }
          }, function () { resolve(undefined); });
        };
        more();
      } else { resolve(undefined); }
    });
  }
  box.addEventListener('dragover', function (e) { e.preventDefault(); box.classList.add('over'); });
  box.addEventListener('dragleave', function () { box.classList.remove('over'); });
  box.addEventListener('drop', async function (e) {
    e.preventDefault();
    box.classList.remove('over');
    var dt = e.dataTransfer;
    if (!dt) return;
    var out = [];
    var entries = Array.prototype.map.call(dt.items || [], function (i) {
      return i.webkitGetAsEntry ? i.webkitGetAsEntry() : null;
    }).filter(Boolean);
    if (entries.length) {
      for (var i = 0; i < entries.length; i++) await walk(entries[i], '', out);
    } else {
      Array.prototype.forEach.call(dt.files, function (f) { out.push({file: f, name: f.name}); });
    }
    start(out);
  });
})();
