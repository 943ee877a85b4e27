// Fetches rendered images by priority, a few at a time, and keeps the decoded ones.
// The viewer says what it wants (URL and priority) after every move; queued requests that
// are no longer wanted are dropped, requests in flight finish and stay cached.

/** @typedef {{url: string, priority: number}} Want */

export class ImageStore {
  /**
   * @param {{concurrency?: number, limit?: number, onLoad: (url: string, ok: boolean) => void}} options
   */
  constructor({ concurrency = 6, limit = 600, onLoad }) {
    this.concurrency = concurrency;
    this.limit = limit;
    this.onLoad = onLoad;
    /** @type {Map<string, HTMLImageElement>} */
    this.done = new Map();
    /** @type {Set<string>} */
    this.loading = new Set();
    /** @type {Set<string>} */
    this.failed = new Set();
    /** @type {Want[]} */
    this.queue = [];
    this.bytes = 0;
  }

  /** @param {string} url @returns {HTMLImageElement | undefined} */
  get(url) {
    return this.done.get(url);
  }

  /** @param {string} url */
  has(url) {
    return this.done.has(url) || this.loading.has(url) || this.failed.has(url);
  }

  /**
   * Replace the wish list: lower priority numbers load first.
   * @param {Want[]} wants
   */
  plan(wants) {
    this.queue = wants.filter((w) => !this.has(w.url)).sort((a, b) => a.priority - b.priority);
    this.keep = new Set(wants.map((w) => w.url));
    this.pump();
  }

  /** Number of requests still queued or in flight. */
  get pending() {
    return this.queue.length + this.loading.size;
  }

  pump() {
    while (this.loading.size < this.concurrency && this.queue.length) {
      const next = /** @type {Want} */ (this.queue.shift());
      if (!this.has(next.url)) this.start(next);
    }
  }

  /** @param {Want} want */
  start(want) {
    const img = new Image();
    img.decoding = 'async';
    img.alt = '';
    if (want.priority < 2) img.fetchPriority = 'high';
    this.loading.add(want.url);
    const finish = (/** @type {boolean} */ ok) => {
      this.loading.delete(want.url);
      if (ok) {
        this.done.set(want.url, img);
        this.evict();
      } else {
        this.failed.add(want.url);
      }
      this.onLoad(want.url, ok);
      this.pump();
    };
    img.src = want.url;
    img.decode().then(() => finish(true), () => finish(img.complete && img.naturalWidth > 0));
  }

  /** Drop the oldest images nobody wants any more once over the limit. */
  evict() {
    if (this.done.size <= this.limit) return;
    for (const url of this.done.keys()) {
      if (this.done.size <= this.limit) break;
      if (!this.keep || !this.keep.has(url)) this.done.delete(url);
    }
  }
}
