// Fetches rendered images by priority, a few at a time, and keeps the decoded ones.
// The viewer says what it wants (URL and priority) after every move; queued requests that
// are no longer wanted are dropped, requests in flight finish and stay cached.
// A load that fails because the network is gone is not a failed image: the loader pauses,
// says so (onTrouble), tries again with a growing pause (1 s, 2 s, ... 30 s, or at once when
// the browser is back online) and says when images load again.

/** @typedef {{url: string, priority: number}} Want */

export class ImageStore {
  /**
   * @param {{concurrency?: number, limit?: number, onLoad: (url: string, ok: boolean) => void,
   *   onTrouble?: (offline: boolean) => void}} options
   */
  constructor({ concurrency = 6, limit = 600, onLoad, onTrouble = () => {} }) {
    this.concurrency = concurrency;
    this.limit = limit;
    this.onLoad = onLoad;
    this.onTrouble = onTrouble;
    /** Loads that failed for want of a network, to try again. @type {Map<string, Want>} */
    this.waiting = new Map();
    /** Failed loads of an answer that was there (a decode failure, a busy server). @type {Map<string, number>} */
    this.tries = new Map();
    this.offline = false; // told the viewer; cleared when an image loads again
    this.paused = false; // no new loads until the next try
    this.delay = 1000;
    this.timer = 0;
    /** @type {Map<string, HTMLImageElement>} */
    this.done = new Map();
    /** @type {Set<string>} */
    this.loading = new Set();
    /** @type {Set<string>} */
    this.failed = new Set();
    /** Images handed over whole (add), still decoding. @type {Set<string>} */
    this.adding = new Set();
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
    return this.done.has(url) || this.loading.has(url) || this.failed.has(url)
      || this.adding.has(url);
  }

  /**
   * Replace the wish list: lower priority numbers load first.
   * @param {Want[]} wants
   */
  plan(wants) {
    this.queue = wants.filter((w) => !this.has(w.url) && !this.waiting.has(w.url))
      .sort((a, b) => a.priority - b.priority);
    this.keep = new Set(wants.map((w) => w.url));
    this.pump();
  }

  /**
   * Keep an image that came another way (a part of the series' stack) as if loaded here.
   * @param {string} url what it stands for @param {Blob} blob
   */
  add(url, blob) {
    if (this.has(url)) return;
    const img = new Image();
    const src = URL.createObjectURL(blob);
    img.src = src;
    this.adding.add(url); // decoding: not to be asked for meanwhile
    img.decode().then(() => {
      this.done.set(url, img);
      this.evict();
      this.onLoad(url, true);
    }, () => {}).finally(() => { this.adding.delete(url); URL.revokeObjectURL(src); });
  }

  /** Number of requests still queued or in flight. */
  get pending() {
    return this.queue.length + this.loading.size + this.waiting.size;
  }

  pump() {
    while (!this.paused && this.loading.size < this.concurrency && this.queue.length) {
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
        this.tries.delete(want.url);
        this.evict();
        this.recovered();
      } else {
        this.failed.add(want.url);
      }
      this.onLoad(want.url, ok);
      this.pump();
    };
    img.src = want.url;
    img.decode().then(() => finish(true), async () => {
      if (img.complete && img.naturalWidth > 0) { finish(true); return; }
      const again = await this.worthRetrying(want.url);
      if (!again) { finish(false); return; }
      this.loading.delete(want.url);
      this.waiting.set(want.url, want);
      if (again === 'offline' && !this.offline) { this.offline = true; this.onTrouble(true); }
      this.paused = again === 'offline';
      this.schedule();
      this.pump();
    });
  }

  /**
   * Why a load failed: 'offline' (no answer at all), 'again' (an answer that may come right
   * next time: the image decoded badly, the server was busy), or '' (a real refusal).
   * @param {string} url
   * @returns {Promise<'offline' | 'again' | ''>}
   */
  async worthRetrying(url) {
    if (!navigator.onLine) return 'offline';
    let answer;
    try {
      answer = await fetch(url, { method: 'HEAD', cache: 'no-store', credentials: 'same-origin', redirect: 'manual' });
    } catch {
      return 'offline';
    }
    const tries = (this.tries.get(url) || 0) + 1;
    this.tries.set(url, tries);
    const passing = answer.ok || answer.status === 408 || answer.status === 429 || answer.status >= 500;
    return passing && tries <= 3 ? 'again' : '';
  }

  /** Try the waiting loads after the current pause, doubling it each time (at most 30 s). */
  schedule() {
    if (this.timer) return;
    const wait = this.delay * (0.8 + Math.random() * 0.4); // spread: not every phone at once
    this.timer = window.setTimeout(() => { this.timer = 0; this.retry(); }, wait);
    this.delay = Math.min(this.delay * 2, 30000);
  }

  /** Put the waiting loads that are still wanted back in the queue, and go on. */
  retry() {
    clearTimeout(this.timer);
    this.timer = 0;
    this.paused = false;
    const again = [...this.waiting.values()].filter((w) => !this.keep || this.keep.has(w.url));
    this.waiting.clear();
    this.queue = [...again, ...this.queue].sort((a, b) => a.priority - b.priority);
    this.pump();
  }

  /** The network is back (the browser says so): try at once, from a short pause again. */
  retryNow() {
    this.delay = 1000;
    if (this.waiting.size) this.retry();
    else this.recovered();
  }

  /** An image loaded (or nothing is waiting any more): the trouble is over. */
  recovered() {
    this.delay = 1000;
    if (!this.offline) return;
    this.offline = false;
    this.onTrouble(false);
    if (this.waiting.size) this.retry(); // the other waiting loads follow at once
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
