// A whole series' small renditions in one request: PS3.18 rendered series as
// multipart/related (docs/conformance/dicomweb.md "Rendered series"). The server streams the
// parts in order as they render, each naming its frame in Content-Location and its size in
// Content-Length, so every slice is handed on as soon as its bytes are here.

const CRLF2 = '\r\n\r\n';

/**
 * Fetch `url` as multipart/related images; call `onPart(location, blob)` for each part.
 * Resolves when the body ends; rejects on a refusal or a broken body.
 * @param {string} url
 * @param {string} type the image type asked for, e.g. image/jpeg
 * @param {(location: string, blob: Blob) => void} onPart
 */
export async function loadStack(url, type, onPart) {
  const answer = await fetch(url, {
    headers: { Accept: `multipart/related; type="${type}"` }, credentials: 'same-origin',
  });
  const boundary = /boundary="?([^";\s]+)/i.exec(answer.headers.get('Content-Type') || '')?.[1];
  if (!answer.ok || !answer.body || !boundary) throw new Error(`stack: ${answer.status}`);
  const reader = answer.body.getReader();
  const latin1 = new TextDecoder('latin1');
  let buffer = new Uint8Array(0);
  for (;;) {
    const { done, value } = await reader.read();
    if (value) {
      const joined = new Uint8Array(buffer.length + value.length);
      joined.set(buffer);
      joined.set(value, buffer.length);
      buffer = joined;
    }
    // Every complete part in the buffer: "--boundary", headers, blank line, payload, CRLF.
    for (;;) {
      const head = latin1.decode(buffer.subarray(0, 4096));
      if (head.startsWith(`--${boundary}--`)) return;
      const end = head.indexOf(CRLF2);
      if (end < 0) break;
      const length = Number(/content-length:\s*(\d+)/i.exec(head.slice(0, end))?.[1]);
      const location = /content-location:\s*(\S+)/i.exec(head.slice(0, end))?.[1] || '';
      if (!Number.isFinite(length)) throw new Error('stack: a part without Content-Length');
      const start = end + CRLF2.length; // header bytes are latin1: one byte per character
      if (buffer.length < start + length + 2) break;
      onPart(location, new Blob([buffer.slice(start, start + length)], { type }));
      buffer = buffer.subarray(start + length + 2);
    }
    if (done) throw new Error('stack: the body ended early');
  }
}
