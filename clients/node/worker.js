// One worker process (`python -m worker`) behind complete()/stream()/ping()/stats()/reload().
// The Worker holds the options and the public counters, routes each stdout message, and
// delegates: process.js (one process), supervisor.js (start, ready, exit, restart, close),
// requests.js (the request table) and calls.js (complete, stream, ping, stats on it),
// reload.js (the zero-downtime switch), recycle.js (optional recycling).
import { EventEmitter } from 'node:events';
import { WorkerError } from './errors.js';
import { REPO_ROOT, defaultPython } from './process.js';
import { Supervisor } from './supervisor.js';
import { RequestTable } from './requests.js';
import * as calls from './calls.js';
import { Reloader } from './reload.js';
import { Recycler } from './recycle.js';

const noop = () => {};

/**
 * @typedef {import('./index.d.ts').WorkerOptions} WorkerOptions
 * @typedef {import('./index.d.ts').GenerateRequest} GenerateRequest
 * @typedef {import('./index.d.ts').RequestOptions} RequestOptions
 * @typedef {import('./index.d.ts').DoneMessage} DoneMessage
 * @typedef {import('./index.d.ts').ReadyMessage} ReadyMessage
 * @typedef {import('./index.d.ts').StatsMessage} StatsMessage
 * @typedef {import('./index.d.ts').CompletionStream} CompletionStream
 */

/** The options with their defaults. @param {WorkerOptions} options */
function withDefaults(options) {
  const restart = options.restart ?? {};
  return {
    python: options.python ?? defaultPython(),
    model: options.model,
    adapter: options.adapter,
    cwd: options.cwd ?? REPO_ROOT,
    env: options.env,
    args: options.args ?? [],
    readyTimeoutMs: options.readyTimeoutMs ?? 180_000,
    requestTimeoutMs: options.requestTimeoutMs,
    queueTimeoutMs: options.queueTimeoutMs ?? 120_000,
    closeGraceMs: options.closeGraceMs ?? 3_000,
    restart: {
      maxRetries: restart.maxRetries ?? 5,
      baseDelayMs: restart.baseDelayMs ?? 250,
      maxDelayMs: restart.maxDelayMs ?? 10_000,
    },
  };
}

/**
 * A long-lived worker process. Events: 'ready' (ready message), 'exit' ({code, signal, pid}),
 * 'stderr' (line), 'restart' ({attempt, delayMs}), 'message' (every parsed stdout message),
 * 'send' (every request object written), 'recycle' ({reason, from, to}: options.recycle
 * replaced the process, recycle.js), 'error' (protocol violations, spawn failures, giving
 * up, a recycle that could not start; emitted only when an 'error' listener is attached).
 */
export class Worker extends EventEmitter {
  /** @param {WorkerOptions} [options] */
  constructor(options = {}) {
    super();
    this.options = withDefaults(options);
    if (options.onMessage) this.on('message', options.onMessage);
    if (options.onStderr) this.on('stderr', options.onStderr);
    /** @type {ReadyMessage | null} */
    this.info = null;
    this.restarts = 0;
    this.reloads = 0;
    /** How many times a stdin write had to wait for 'drain'. */
    this.backpressureWaits = 0;
    /** Processes replaced by `options.recycle` (recycle.js; off by default). */
    this.recycles = 0;
    /** Where every process reports (process.js). */
    this._sink = {
      line: (proc, line) => this._onLine(proc, line),
      stderr: (line) => this.emit('stderr', line),
      exit: (proc, code, signal) => this._sup.onExit(proc, code, signal),
      error: (err) => this._emitError(err),
      send: (obj) => this.emit('send', obj),
      blocked: () => { this.backpressureWaits += 1; },
    };
    this._sup = new Supervisor(this);
    this._table = new RequestTable(this);
    this._reload = new Reloader(this);
    this._recycler = options.recycle ? new Recycler(this, options.recycle) : null;
  }

  /** 'idle' | 'starting' | 'ready' | 'restarting' | 'failed' | 'closing' | 'closed' */
  get state() { return this._sup.state; }
  /** True while a worker process is up and has sent `ready`. */
  get ready() { return this._sup.state === 'ready'; }
  /** pid of the current worker process, or null. */
  get pid() { return this._sup.proc?.pid ?? null; }
  /** Requests the worker still owes a terminal message for, plus those waiting to be sent. */
  get inFlight() { return this._table.requests.size; }

  /**
   * Spawns the worker and resolves with the `ready` message. A failure to start (exit before
   * ready, ready timeout) rejects; there is no retry on the first start.
   * @returns {Promise<ReadyMessage>}
   */
  start() { return this._sup.start(); }

  /**
   * Generates a reply and resolves with the worker's `done` message.
   * Abort: sends `cancel` to the worker and rejects at once with an AbortError (the worker's
   * `done` with finish_reason 'cancelled' is still observable through the 'message' event).
   * Timeout: cancels in the worker and rejects with a TimeoutError.
   * @param {GenerateRequest} request
   * @param {RequestOptions} [opts]
   * @returns {Promise<DoneMessage>}
   */
  complete(request, opts = {}) { return calls.complete(this._table, request, opts); }

  /**
   * Streams the reply: an async iterable of token texts that ends after the worker's `done`
   * (an AsyncQueue fed by the worker's token messages; `opts.onToken` gets each whole token
   * message). `.done` resolves with the `done` message. Abort (signal) or leaving the loop
   * early (break) sends `cancel`: the iteration ends at once without error, and `.done`
   * resolves with the worker's `done` message (finish_reason 'cancelled') once the worker
   * confirms. Worker errors, timeouts and worker exits are thrown by the iterator (after the
   * tokens already received) and reject `.done`.
   * @param {GenerateRequest} request
   * @param {RequestOptions} [opts]
   * @returns {CompletionStream}
   */
  stream(request, opts = {}) { return calls.stream(this._table, request, opts); }

  /**
   * Round trip to the worker. Resolves with the latency in ms.
   * @param {{ timeoutMs?: number }} [opts]
   * @returns {Promise<number>}
   */
  ping(opts = {}) { return calls.ping(this._table, opts); }

  /**
   * Asks the worker for its `stats` message.
   * @param {{ timeoutMs?: number }} [opts]
   * @returns {Promise<StatsMessage>}
   */
  stats(opts = {}) { return calls.stats(this._table, opts); }

  /**
   * Shuts the worker down: pending requests reject with WorkerExitedError (closed: true),
   * `{"op":"shutdown"}` is sent and stdin ended, then after `graceMs` (default
   * closeGraceMs, 3 s) the process is SIGKILLed. Resolves once the process is gone (and a
   * reload's new or old processes too). Idempotent; no restart afterwards.
   * @param {{ graceMs?: number }} [opts]
   * @returns {Promise<void>}
   */
  close(opts = {}) {
    this._recycler?.stop();
    return this._sup.close(opts);
  }

  /**
   * Zero-downtime switch to another adapter (or model): starts a new worker process, waits
   * for its `ready`, sends every new request there, lets the requests in flight finish on
   * the old process, then stops it. If the new process cannot start, the old one keeps
   * serving and the promise rejects with a WorkerError (code 'reload_failed') giving the
   * reason. Resolves with the new `ready` message. Events: 'reload' ({ from, to }).
   * @param {{ adapter?: string | null, model?: string | null }} change null removes the option
   * @returns {Promise<ReadyMessage>}
   */
  async reload(change = {}) {
    const staged = await this.prepareReload(change);
    return staged.commit();
  }

  /**
   * The first half of reload(): resolves once the new process is ready, with
   * `{ ready, commit(), abort() }`; nothing has changed for requests yet. commit() switches
   * (returns the ready message), abort() stops the new process. Pool.reload() uses it to
   * switch all its workers only when every new process started.
   * @param {{ adapter?: string | null, model?: string | null }} change
   */
  prepareReload(change = {}) { return this._reload.prepare(change); }

  /** @param {any} err */
  _emitError(err) {
    if (this.listenerCount('error') > 0) this.emit('error', err);
  }

  /** One stdout line of proc: parsed, emitted as 'message', routed by type. */
  _onLine(proc, line) {
    let msg;
    try {
      msg = JSON.parse(line);
    } catch (err) {
      this._emitError(new WorkerError('protocol', `worker wrote a non-JSON line on stdout: ${line.slice(0, 200)}`, { cause: err }));
      return;
    }
    if (msg === null || typeof msg !== 'object' || Array.isArray(msg)) {
      this._emitError(new WorkerError('protocol', 'worker wrote a line that is not a JSON object'));
      return;
    }
    if (proc !== this._sup.proc && !this._reload.owns(proc)) return;
    this.emit('message', msg);
    if (msg.type === 'ready') {
      if (this._reload.isCandidate(proc)) this._reload.onReady(proc, msg);
      else this._sup.onReady(proc, msg);
      return;
    }
    if (!this._table.route(proc, msg)) {
      this._emitError(new WorkerError('protocol', `unknown message type ${JSON.stringify(msg.type)}`));
    }
  }
}

/**
 * Creates a worker without starting it (call `.start()`); requests made before it is ready
 * wait for `ready` (bounded by queueTimeoutMs).
 * @param {WorkerOptions} [options]
 */
export function createWorker(options = {}) {
  return new Worker(options);
}

/**
 * Spawns a worker and resolves once it has sent `ready`.
 * @param {WorkerOptions} [options]
 * @returns {Promise<Worker>}
 */
export async function startWorker(options = {}) {
  const w = new Worker(options);
  try {
    await w.start();
  } catch (err) {
    await w.close().catch(noop);
    throw err;
  }
  return w;
}
