// The process supervisor: starts the worker process, marks it ready, and when it exits fails
// what it owed, then restarts it with bounded exponential backoff (or gives up, or reports a
// failed first start); close() stops every process. It owns the worker's state and its
// current process; the requests are requests.js's, a reload's processes reload.js's.
import { WorkerExitedError } from './errors.js';
import { WorkerProcess } from './process.js';

const noop = () => {};

/**
 * Bounded exponential backoff: baseDelayMs * 2^attempt, capped at maxDelayMs.
 * @param {number} attempt 0 for the first retry
 * @param {{ baseDelayMs?: number, maxDelayMs?: number }} [opts]
 */
export function backoffDelay(attempt, opts = {}) {
  const base = opts.baseDelayMs ?? 250;
  const max = opts.maxDelayMs ?? 10_000;
  const n = Math.max(0, Math.min(attempt, 30));
  return Math.min(max, base * 2 ** n);
}

export class Supervisor {
  /** @param {import('./worker.js').Worker} worker */
  constructor(worker) {
    this.w = worker;
    /** 'idle' | 'starting' | 'ready' | 'restarting' | 'failed' | 'closing' | 'closed' */
    this.state = 'idle';
    /** The process new requests go to. @type {WorkerProcess | null} */
    this.proc = null;
    /** Restarts in a row whose process exited before `ready`. */
    this.failures = 0;
    this.restartTimer = null;
    /** The first start's { resolve, reject } until it settles (no retry before that). */
    this.initial = null;
    this.startPromise = null;
    this.closePromise = null;
  }

  get closing() { return this.state === 'closing' || this.state === 'closed'; }

  /** A new process with these options, reporting to the worker. */
  launch(options) {
    return new WorkerProcess(options, this.w._sink);
  }

  /** See Worker.start. */
  start() {
    if (this.startPromise) return this.startPromise;
    if (this.closing) return Promise.reject(new WorkerExitedError('worker closed', { closed: true }));
    this.startPromise = new Promise((resolve, reject) => {
      this.initial = { resolve, reject };
    });
    this.startPromise.catch(noop);
    this.spawn();
    return this.startPromise;
  }

  spawn() {
    this.state = this.proc === null && this.w.restarts === 0 ? 'starting' : 'restarting';
    this.proc = this.launch(this.w.options);
  }

  /** The current process sent `ready`: requests waiting for it go now. */
  onReady(proc, msg) {
    const w = this.w;
    if (!proc.markReady(msg)) return;
    w.info = msg;
    this.failures = 0;
    if (this.closing) return;
    this.state = 'ready';
    w.emit('ready', msg);
    if (this.initial) {
      this.initial.resolve(msg);
      this.initial = null;
    }
    w._table.sendWaiting();
  }

  /** Takes a reload's new process (ready) as the current one; returns the one it replaces. */
  adopt(proc, msg) {
    const old = this.proc;
    clearTimeout(this.restartTimer);
    this.restartTimer = null;
    this.proc = proc;
    this.w.info = msg;
    this.failures = 0;
    this.state = 'ready';
    return old;
  }

  /** Any process exited: what was sent to it fails; the current one is restarted. */
  onExit(proc, code, signal) {
    const w = this.w;
    const current = this.proc === proc;
    if (current) this.proc = null;
    w.emit('exit', { code, signal, pid: proc.pid });

    const closing = this.closing;
    const message = proc.describeExit(code, signal);
    const mkErr = (id) => new WorkerExitedError(message, { id, exitCode: code, signal, closed: closing });
    w._table.failProcess(proc, mkErr); // requests sent to this process can no longer finish
    if (w._reload.onExit(proc, message)) return;
    if (closing || !current) return;

    if (this.initial) {
      // The first start failed: report it, no retry.
      this.state = 'failed';
      this.initial.reject(mkErr(null));
      this.initial = null;
      w._table.failWaiting(mkErr(null));
      return;
    }
    this.restartAfter(proc, message, code, signal);
  }

  /** The current process died (not closing): restart with backoff, or give up. */
  restartAfter(proc, message, code, signal) {
    const w = this.w;
    if (!proc.ready) this.failures += 1;
    const maxRetries = w.options.restart.maxRetries;
    if (this.failures >= maxRetries) {
      this.state = 'failed';
      const err = new WorkerExitedError(
        `worker gave up restarting after ${this.failures} consecutive failed restart(s) (maxRetries ${maxRetries}); last: ${message}`,
        { exitCode: code, signal });
      w._table.failWaiting(err);
      w._emitError(err);
      return;
    }
    const delayMs = backoffDelay(this.failures, w.options.restart);
    this.state = 'restarting';
    w.restarts += 1;
    w.emit('restart', { attempt: this.failures + 1, delayMs, code, signal });
    this.restartTimer = setTimeout(() => {
      this.restartTimer = null;
      if (this.state === 'restarting') this.spawn();
    }, delayMs);
  }

  /** See Worker.close. */
  close(opts = {}) {
    if (this.closePromise) return this.closePromise;
    const w = this.w;
    const graceMs = opts.graceMs ?? w.options.closeGraceMs;
    this.state = 'closing';
    clearTimeout(this.restartTimer);
    this.restartTimer = null;
    const closedErr = (id) => new WorkerExitedError('worker closed', { id, closed: true });
    if (this.initial) {
      this.initial.reject(closedErr(null));
      this.initial = null;
    }
    w._table.failAll(closedErr);
    const procs = [this.proc, ...w._reload.close(closedErr(null))].filter(Boolean);
    this.closePromise = Promise.all(procs.map((p) => this.stop(p, graceMs)))
      .then(() => { this.state = 'closed'; });
    return this.closePromise;
  }

  /** Stops one process (its stats waiters fail: no reply will come). Resolves once it is gone. */
  stop(proc, graceMs = this.w.options.closeGraceMs) {
    this.w._table.dropStats(proc, () => new WorkerExitedError('worker closed', { closed: true }));
    return proc.stop(graceMs);
  }
}
