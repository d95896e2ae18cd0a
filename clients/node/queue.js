// An async queue behind CompletionStream: push() values, end() or fail() once, iterate.

/**
 * Values pushed before the consumer asks are kept; next() waits for the next one. end(value)
 * finishes the iteration after the values already queued ({ done: true, value }); fail(err)
 * makes next() throw err once, after them; close() drops what is queued and finishes now.
 * Whatever comes after the first end/fail/close is ignored.
 * @template T
 */
export class AsyncQueue {
  constructor() {
    /** @type {T[]} */
    this._items = [];
    /** @type {{ resolve: Function, reject: Function }[]} */
    this._waiters = [];
    /** @type {null | { value?: unknown, error?: unknown }} */
    this._end = null;
  }

  /** True once end(), fail() or close() was called. */
  get ended() { return this._end !== null; }

  /** @param {T} value @returns {boolean} false when the queue has ended */
  push(value) {
    if (this._end) return false;
    const w = this._waiters.shift();
    if (w) w.resolve({ value, done: false });
    else this._items.push(value);
    return true;
  }

  /** @param {unknown} [value] what the final { done: true } carries */
  end(value) {
    if (this._end) return;
    this._end = { value };
    this._drain();
  }

  /** @param {unknown} error thrown by next() once the queued values are taken */
  fail(error) {
    if (this._end) return;
    this._end = { error };
    this._drain();
  }

  /** Drops the queued values and ends now. */
  close(value) {
    this._items.length = 0;
    if (!this._end || this._end.error !== undefined) this._end = { value };
    this._drain();
  }

  /** @returns {Promise<IteratorResult<T>>} */
  next() {
    return new Promise((resolve, reject) => {
      this._waiters.push({ resolve, reject });
      this._drain();
    });
  }

  _drain() {
    while (this._waiters.length > 0 && (this._items.length > 0 || this._end)) {
      const w = this._waiters.shift();
      if (this._items.length > 0) {
        w.resolve({ value: this._items.shift(), done: false });
      } else if (this._end.error !== undefined) {
        const { error } = this._end;
        this._end = { value: undefined };       // thrown once; then the iteration is over
        w.reject(error);
      } else {
        w.resolve({ value: this._end.value, done: true });
      }
    }
  }
}
