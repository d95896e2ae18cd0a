// The request table: every generation request and control message (ping, stats) the worker
// owes a reply. Submit (an id), dispatch (now to the ready process, else queued until there
// is one, bounded by queueTimeoutMs), cancel, route the worker's replies by id, fail what a
// process can no longer answer. The calls built on it (complete, stream, ping, stats: their
// timeouts, abort signals and settling) are calls.js's.
import { randomBytes } from 'node:crypto';
import { TimeoutError, WorkerError, WorkerExitedError } from './errors.js';

const noop = () => {};

/**
 * A lone surrogate (half of a UTF-16 pair) is not text: JSON.stringify escapes it, the worker
 * cannot decode the line, and so it could not answer the request's id. Such requests are
 * refused in the client, at once.
 * @param {unknown} value
 * @returns {boolean}
 */
function hasLoneSurrogate(value) {
  if (typeof value === 'string') return !value.isWellFormed();
  if (Array.isArray(value)) return value.some(hasLoneSurrogate);
  if (value && typeof value === 'object') {
    return Object.entries(value).some(([k, v]) => !k.isWellFormed() || hasLoneSurrogate(v));
  }
  return false;
}

export class RequestTable {
  /** @param {import('./worker.js').Worker} worker */
  constructor(worker) {
    this.w = worker;
    this.prefix = randomBytes(4).toString('hex');
    this.counter = 0;
    /** @type {Map<string, any>} requests the worker owes a terminal message (or not yet sent) */
    this.requests = new Map();
    /** @type {Set<any>} requests waiting for a ready worker */
    this.waiting = new Set();
    /** @type {Map<string, any>} ping id -> waiter */
    this.pings = new Map();
    /** @type {Set<any>} ping/stats waiting for a ready worker */
    this.controlWaiting = new Set();
  }

  nextId() {
    this.counter += 1;
    return `${this.prefix}-${this.counter}`;
  }

  /**
   * A new generation request with its id (not sent yet). The caller sets its handlers:
   * onToken, onDone, onError (each terminal one called once), then dispatch()es it.
   */
  submit(payload) {
    if (payload === null || typeof payload !== 'object' || Array.isArray(payload)) {
      throw new TypeError('request must be an object with messages or prompt');
    }
    const id = this.nextId();
    const { id: _ignored, ...rest } = payload;
    return {
      id,
      body: { ...rest, id },
      proc: null,
      settled: false,
      onToken: null,
      onDone: noop,
      onError: noop,
      queueTimer: null,
    };
  }

  /** Sends r now if a ready process exists, else queues it until ready (bounded). */
  dispatch(r) {
    const sup = this.w._sup;
    const proc = sup.proc;
    if (sup.closing) {
      this.finish(r);
      r.onError(new WorkerExitedError('worker closed', { id: r.id, closed: true }));
      return;
    }
    if (sup.state === 'failed' && !sup.initial) {
      this.finish(r);
      r.onError(new WorkerExitedError('worker is not running (gave up restarting)', { id: r.id }));
      return;
    }
    if (!proc || !proc.ready) {
      this.requests.set(r.id, r);
      if (!this.waiting.has(r)) {
        this.waiting.add(r);
        const queueTimeoutMs = this.w.options.queueTimeoutMs;
        r.queueTimer = setTimeout(() => {
          if (!this.waiting.has(r)) return;
          this.finish(r);
          r.onError(new TimeoutError(`worker not ready within ${queueTimeoutMs} ms`, { id: r.id }));
        }, queueTimeoutMs);
        r.queueTimer.unref?.();
      }
      return;
    }
    this.waiting.delete(r);
    clearTimeout(r.queueTimer);
    const line = JSON.stringify(r.body);
    if (hasLoneSurrogate(r.body)) {
      this.finish(r);
      r.onError(new WorkerError('invalid_request', 'request text contains a lone UTF-16 surrogate (not valid Unicode)', { id: r.id }));
      return;
    }
    const maxBytes = this.w.info?.max_line_bytes;
    if (maxBytes && Buffer.byteLength(line) + 1 > maxBytes) {
      this.finish(r);
      r.onError(new WorkerError('too_large',
        `request is ${Buffer.byteLength(line) + 1} bytes, over the worker's max_line_bytes (${maxBytes})`, { id: r.id }));
      return;
    }
    r.proc = proc;
    this.requests.set(r.id, r);
    proc.write(r.body);
  }

  /** Sends a cancel for r if it was sent; drops it if it was still waiting. @returns {boolean} sent */
  cancel(r) {
    if (r.proc && !r.proc.exited && this.requests.get(r.id) === r) {
      r.proc.write({ op: 'cancel', id: r.id });
      return true;
    }
    if (this.waiting.has(r) || (this.requests.get(r.id) === r && !r.proc)) {
      this.finish(r);
    }
    return false;
  }

  /** Drops a request from the bookkeeping (it got, or will never get, its terminal message). */
  finish(r) {
    this.requests.delete(r.id);
    this.waiting.delete(r);
    clearTimeout(r.queueTimer);
    if (r.proc) this.w._reload.release(r.proc);
  }

  /** A process became ready: what waited for one goes to it now. */
  sendWaiting() {
    for (const r of [...this.waiting]) this.dispatch(r);
    for (const c of [...this.controlWaiting]) c.send();
  }

  /** No process will come (first start failed, gave up restarting): the waiting fail. */
  failWaiting(err) {
    for (const r of [...this.waiting]) {
      this.finish(r);
      r.onError(err);
    }
    for (const c of [...this.controlWaiting]) c.reject(err);
  }

  /** proc exited: what was sent to it fails with mkErr(id). */
  failProcess(proc, mkErr) {
    for (const r of [...this.requests.values()]) {
      if (r.proc !== proc) continue;
      this.finish(r);
      r.onError(mkErr(r.id));
    }
    for (const c of this.pings.values()) if (c.proc === proc) c.reject(mkErr(c.id));
    for (const c of proc.statsWaiters.splice(0)) c.reject(mkErr(null));
  }

  /** close(): everything fails with mkErr(id), sent or waiting. */
  failAll(mkErr) {
    for (const r of [...this.requests.values()]) {
      this.finish(r);
      r.onError(mkErr(r.id));
    }
    for (const c of [...this.pings.values()]) c.reject(mkErr(c.id));
    for (const c of [...this.controlWaiting]) c.reject(mkErr(null));
  }

  /** proc is being stopped: its stats waiters fail with mkErr(). */
  dropStats(proc, mkErr) {
    for (const c of proc.statsWaiters.splice(0)) c.reject(mkErr());
  }

  /** Does proc still owe a reply (a request's terminal message, a pong, stats)? */
  owes(proc) {
    for (const r of this.requests.values()) if (r.proc === proc) return true;
    for (const c of this.pings.values()) if (c.proc === proc) return true;
    return proc.statsWaiters.length > 0;
  }

  /**
   * A message from proc to whoever waits for it (by id; stats in order). An error with no
   * request of proc's is emitted as the worker's 'error'. False: not a reply's type.
   */
  route(proc, msg) {
    switch (msg.type) {
      case 'token': {
        const r = this.requests.get(msg.id);
        if (r && r.proc === proc && !r.settled && r.onToken) r.onToken(msg);
        return true;
      }
      case 'done': {
        const r = this.requests.get(msg.id);
        if (!r || r.proc !== proc) return true;
        this.finish(r);
        r.onDone(msg);
        return true;
      }
      case 'error': {
        const err = new WorkerError(String(msg.code), String(msg.message), { id: msg.id ?? null });
        const r = msg.id != null ? this.requests.get(msg.id) : undefined;
        if (r && r.proc === proc) {
          this.finish(r);
          r.onError(err);
        } else {
          this.w._emitError(err);
        }
        return true;
      }
      case 'pong': {
        const c = msg.id != null ? this.pings.get(msg.id) : undefined;
        if (c) c.resolve(msg);
        return true;
      }
      case 'stats': {
        const c = proc.statsWaiters.shift();
        if (c) c.resolve(msg);
        return true;
      }
      default:
        return false;
    }
  }
}
