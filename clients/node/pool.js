// N workers behind one API: each request goes to the ready worker with the fewest in flight.
import { EventEmitter } from 'node:events';
import { Worker } from './worker.js';

const noop = () => {};

/**
 * N workers behind the same complete/stream/ping/stats/close API; each request goes to the
 * ready worker with the fewest requests in flight. Re-emits the workers' events with the
 * worker as last argument.
 */
export class Pool extends EventEmitter {
  /** @param {Worker[]} workers */
  constructor(workers) {
    super();
    this.workers = workers;
    this._rr = 0;
    for (const w of workers) {
      for (const ev of ['ready', 'exit', 'stderr', 'restart', 'reload', 'recycle', 'message', 'send']) {
        w.on(ev, (arg) => this.emit(ev, arg, w));
      }
      w.on('error', (err) => { if (this.listenerCount('error') > 0) this.emit('error', err, w); });
    }
  }

  get size() { return this.workers.length; }
  get ready() { return this.workers.some((w) => w.ready); }
  get inFlight() { return this.workers.reduce((n, w) => n + w.inFlight, 0); }

  /** The worker the next request goes to. @returns {Worker} */
  pick() {
    let best = null;
    const n = this.workers.length;
    for (let k = 0; k < n; k++) {
      const w = this.workers[(this._rr + k) % n];
      if (w.state === 'closed' || w.state === 'closing') continue;
      if (!best) { best = w; continue; }
      const wr = w.ready ? 0 : w.state === 'failed' ? 2 : 1;
      const br = best.ready ? 0 : best.state === 'failed' ? 2 : 1;
      if (wr < br || (wr === br && w.inFlight < best.inFlight)) best = w;
    }
    this._rr = (this._rr + 1) % Math.max(1, n);
    return best ?? this.workers[0];
  }

  /** @param {GenerateRequest} request @param {RequestOptions} [opts] */
  complete(request, opts) { return this.pick().complete(request, opts); }
  /** @param {GenerateRequest} request @param {RequestOptions} [opts] */
  stream(request, opts) { return this.pick().stream(request, opts); }
  /** Pings every worker. @returns {Promise<number[]>} */
  ping(opts) { return Promise.all(this.workers.map((w) => w.ping(opts))); }
  /** @returns {Promise<StatsMessage[]>} */
  stats(opts) { return Promise.all(this.workers.map((w) => w.stats(opts))); }
  /** @returns {Promise<void>} */
  async close(opts) { await Promise.all(this.workers.map((w) => w.close(opts))); }

  /**
   * Zero-downtime reload of every worker (see Worker.reload): all new processes start side
   * by side with the old ones; only when every one is ready do new requests go to them
   * (requests in flight finish on the old ones). If any fails to start, the others are
   * stopped, the old processes keep serving and the promise rejects with that reason.
   * @param {{ adapter?: string | null, model?: string | null }} change
   * @returns {Promise<import('./index.d.ts').ReadyMessage[]>}
   */
  async reload(change = {}) {
    const staged = await Promise.allSettled(this.workers.map((w) => w.prepareReload(change)));
    const failed = staged.find((x) => x.status === 'rejected');
    if (failed) {
      await Promise.all(staged.filter((x) => x.status === 'fulfilled').map((x) => x.value.abort()));
      throw failed.reason;
    }
    return staged.map((x) => x.value.commit());
  }
}

/**
 * Starts `size` workers (in parallel) and resolves with a Pool once all are ready.
 * @param {WorkerOptions & { size?: number }} [options]
 * @returns {Promise<Pool>}
 */
export async function startPool(options = {}) {
  const { size = 2, ...workerOptions } = options;
  if (!Number.isInteger(size) || size < 1) throw new RangeError('pool size must be an integer >= 1');
  const workers = Array.from({ length: size }, () => new Worker(workerOptions));
  const results = await Promise.allSettled(workers.map((w) => w.start()));
  const failed = results.find((x) => x.status === 'rejected');
  if (failed) {
    await Promise.all(workers.map((w) => w.close().catch(noop)));
    throw failed.reason;
  }
  return new Pool(workers);
}
