// Optional recycling of a worker process: a safety valve for long-lived deployments.
//
// However well the worker accounts for its memory (docs/MEMORY.md), a process that lives for
// weeks may want a ceiling. With `recycle: { maxRequests, maxResidentBytes }` in the
// Worker's options, a fresh process replaces the current one through the zero-downtime
// reload path (Worker.reload() with no change, reload.js): the new process starts beside the old one,
// takes every new request once ready, and the old one finishes what it has in flight before
// it stops. No request is dropped. Both limits are off by default.
//
// - maxRequests: after this many generation requests sent to one process.
// - maxResidentBytes: when the process's memory passes it: `stats.memory.resident_bytes`
//   (the RSS on the CPU backend, RSS + mlx's buffers on Metal/CUDA), asked for every
//   checkIntervalMs (default 10 s) while the worker is ready.
//
// A recycle that cannot start its new process leaves the old one serving; the failure is
// emitted as an 'error' (WorkerError 'reload_failed') and tried again at the next trigger.
// A recycle and a reload() asked for at the same moment: the second one is refused with
// 'another reload is in progress'.

const noop = () => {};

export class Recycler {
  /**
   * @param {import('./worker.js').Worker} worker
   * @param {{ maxRequests?: number, maxResidentBytes?: number, checkIntervalMs?: number }} opts
   */
  constructor(worker, opts = {}) {
    for (const key of ['maxRequests', 'maxResidentBytes', 'checkIntervalMs']) {
      const v = opts[key];
      if (v !== undefined && v !== null && !(Number.isFinite(v) && v > 0)) {
        throw new TypeError(`recycle.${key} must be a positive number (got ${String(v)})`);
      }
    }
    this.worker = worker;
    this.maxRequests = opts.maxRequests ?? null;
    this.maxResidentBytes = opts.maxResidentBytes ?? null;
    this.checkIntervalMs = opts.checkIntervalMs ?? 10_000;
    /** Generation requests sent to the current process. */
    this.sent = 0;
    this.recycling = false;
    this.timer = null;
    worker.on('send', (obj) => {
      if (obj.id !== undefined && obj.op === undefined) this.onRequest();
    });
    // a new process (first start, restart after a crash, reload or recycle) starts at 0
    worker.on('ready', () => { this.sent = 0; });
    if (this.maxResidentBytes) {
      this.timer = setInterval(() => this.checkMemory(), this.checkIntervalMs);
      this.timer.unref?.();
    }
  }

  get enabled() { return Boolean(this.maxRequests || this.maxResidentBytes); }

  onRequest() {
    this.sent += 1;
    if (this.maxRequests && this.sent >= this.maxRequests) this.recycle('requests', { requests: this.sent });
  }

  async checkMemory() {
    const w = this.worker;
    if (this.recycling || !w.ready) return;
    let stats;
    try {
      stats = await w.stats({ timeoutMs: Math.max(1_000, this.checkIntervalMs) });
    } catch {
      return; // restarting or closing: the next tick asks again
    }
    const resident = stats.memory?.resident_bytes ?? stats.memory?.rss_bytes ?? 0;
    if (resident >= this.maxResidentBytes) this.recycle('memory', { residentBytes: resident });
  }

  /** Starts a recycle unless one (or a reload) is under way. Resolves when it is done. */
  recycle(reason, detail = {}) {
    const w = this.worker;
    if (this.recycling || !w.ready || w._reload.inProgress) return Promise.resolve(null);
    this.recycling = true;
    const from = w.pid;
    return w.reload({}).then(
      (ready) => {
        w.recycles += 1;
        w.emit('recycle', { reason, ...detail, from, to: ready.pid });
        return ready;
      },
      (err) => {
        if (w.state !== 'closing' && w.state !== 'closed' && w.listenerCount('error') > 0) w.emit('error', err);
        return null;
      },
    ).finally(() => { this.recycling = false; }).catch(noop);
  }

  stop() {
    clearInterval(this.timer);
    this.timer = null;
  }
}
