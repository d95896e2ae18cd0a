// Reload: a zero-downtime switch to another adapter (or model). A new process (the
// candidate) starts beside the current one; once it is ready, commit() makes it current
// (every new request goes there) and retires the old one, which is stopped as soon as it owes
// no reply. If the candidate cannot start, the old process keeps serving. recycle.js uses the
// same path with no change.
import { WorkerError, WorkerExitedError } from './errors.js';

export class Reloader {
  /** @param {import('./worker.js').Worker} worker */
  constructor(worker) {
    this.w = worker;
    /** The process being started ({ proc, options, onReady, onFail }), or null. */
    this.candidate = null;
    /** Old processes finishing their requests before they stop. */
    this.retiring = new Set();
  }

  /** True while a reload (or recycle) is starting its new process. */
  get inProgress() { return this.candidate !== null; }

  /** Is proc a reload's (the candidate, or an old one still finishing)? */
  owns(proc) { return this.retiring.has(proc) || proc === this.candidate?.proc; }

  isCandidate(proc) { return proc === this.candidate?.proc; }

  /** See Worker.prepareReload. */
  prepare(change = {}) {
    const w = this.w;
    if (w._sup.closing) return Promise.reject(new WorkerExitedError('worker closed', { closed: true }));
    if (this.candidate) return Promise.reject(new WorkerError('reload_failed', 'reload: another reload is in progress'));
    const options = { ...w.options };
    for (const key of ['adapter', 'model']) {
      if (change[key] !== undefined) options[key] = change[key] ?? undefined;
    }
    return new Promise((resolve, reject) => {
      const candidate = { options, proc: null };
      candidate.onReady = (msg) => resolve({
        ready: msg,
        commit: () => this.commit(candidate, msg),
        abort: () => this.abort(candidate),
      });
      candidate.onFail = (err) => {
        if (this.candidate === candidate) this.candidate = null;
        reject(err);
      };
      this.candidate = candidate;
      candidate.proc = w._sup.launch(options);
    });
  }

  /** The candidate sent `ready`. */
  onReady(proc, msg) {
    if (proc.markReady(msg)) this.candidate.onReady(msg);
  }

  commit(candidate, msg) {
    const w = this.w;
    if (this.candidate !== candidate || candidate.proc.exited) {
      throw new WorkerError('reload_failed', 'reload: the new worker process is gone or the reload was aborted');
    }
    this.candidate = null;
    const from = w.info;
    w.options = candidate.options;
    const old = w._sup.adopt(candidate.proc, msg);
    w.reloads += 1;
    if (old) this.retire(old);
    w.emit('reload', { from, to: msg });
    w.emit('ready', msg);
    w._table.sendWaiting();
    return msg;
  }

  abort(candidate) {
    if (this.candidate === candidate) this.candidate = null;
    return this.w._sup.stop(candidate.proc);
  }

  /** The old process of a reload: stopped once its last request has its terminal message. */
  retire(proc) {
    if (proc.exited) return;
    this.retiring.add(proc);
    this.stopIfIdle(proc);
  }

  stopIfIdle(proc) {
    if (!this.retiring.has(proc) || proc.stopped) return;
    if (this.w._table.owes(proc)) return;
    this.w._sup.stop(proc);
  }

  /** A request of proc's got its terminal message: a retiring proc may stop now. */
  release(proc) {
    if (this.retiring.size > 0) this.stopIfIdle(proc);
  }

  /** proc exited; true when it was the candidate (the reload fails, nothing else to do). */
  onExit(proc, message) {
    this.retiring.delete(proc);
    if (this.candidate?.proc !== proc) return false;
    this.candidate.onFail(new WorkerError('reload_failed', `reload: the new ${message}`));
    return true;
  }

  /** close(): the candidate fails with err; returns the processes to stop. */
  close(err) {
    const candidate = this.candidate;
    if (candidate) candidate.onFail(err);
    return [candidate?.proc, ...this.retiring];
  }
}
