// One worker process (`python -m worker`) behind complete()/stream()/ping()/stats()/reload().
import { spawn } from 'node:child_process';
import { EventEmitter } from 'node:events';
import { randomBytes } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import { AbortError, TimeoutError, WorkerError, WorkerExitedError } from './errors.js';
import { LineSplitter } from './lines.js';
import { AsyncQueue } from './queue.js';
import { Recycler } from './recycle.js';

/** Repository root, resolved from this file's location (clients/node/../..). */
export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

/** The protocol version this client speaks. */
export const PROTOCOL_VERSION = 2;

/**
 * Default Python interpreter: env PYTHON, else <repo>/.venv/bin/python.
 * @returns {string}
 */
export function defaultPython() {
  return process.env.PYTHON || path.join(REPO_ROOT, '.venv', 'bin', 'python');
}

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

// Every live child, so they are killed if this process exits without close().
const liveChildren = new Set();
let exitHookInstalled = false;
function trackChild(child) {
  liveChildren.add(child);
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    process.once('exit', () => {
      for (const c of liveChildren) {
        try { c.kill('SIGKILL'); } catch { /* already gone */ }
      }
    });
  }
}

const noop = () => {};

/** A promise with its resolve/reject; rejections are handled (callers need not await it). */
function deferred() {
  const d = {};
  d.promise = new Promise((resolve, reject) => { d.resolve = resolve; d.reject = reject; });
  d.promise.catch(noop);
  return d;
}

// ---------------------------------------------------------------------------
// One worker process

/**
 * @typedef {import('./index.d.ts').WorkerOptions} WorkerOptions
 * @typedef {import('./index.d.ts').GenerateRequest} GenerateRequest
 * @typedef {import('./index.d.ts').RequestOptions} RequestOptions
 * @typedef {import('./index.d.ts').DoneMessage} DoneMessage
 * @typedef {import('./index.d.ts').ReadyMessage} ReadyMessage
 * @typedef {import('./index.d.ts').StatsMessage} StatsMessage
 * @typedef {import('./index.d.ts').CompletionStream} CompletionStream
 */

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
    const restart = options.restart ?? {};
    this.options = {
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
    if (options.onMessage) this.on('message', options.onMessage);
    if (options.onStderr) this.on('stderr', options.onStderr);

    this._prefix = randomBytes(4).toString('hex');
    this._counter = 0;
    /** @type {Map<string, any>} requests the worker owes a terminal message (or not yet sent) */
    this._requests = new Map();
    /** @type {Set<any>} requests waiting for a ready worker */
    this._waiting = new Set();
    /** @type {Map<string, any>} ping id -> waiter */
    this._pings = new Map();
    /** @type {Set<any>} ping/stats waiting for a ready worker */
    this._controlWaiting = new Set();
    /** The process new requests go to. Each process keeps its own FIFO of stats waiters
     * (stats replies carry no id). */
    this._proc = null;
    /** reload(): the process being started ({ proc, options, onReady, onFail }), or null. */
    this._candidate = null;
    /** reload(): old processes finishing their requests before they stop. */
    this._retiring = new Set();
    this.reloads = 0;
    this._state = 'idle'; // idle | starting | ready | restarting | failed | closing | closed
    this._failures = 0;
    this._restartTimer = null;
    this._startPromise = null;
    this._closePromise = null;
    /** @type {ReadyMessage | null} */
    this.info = null;
    this.restarts = 0;
    /** How many times a stdin write had to wait for 'drain'. */
    this.backpressureWaits = 0;
    /** Processes replaced by `options.recycle` (recycle.js; off by default). */
    this.recycles = 0;
    this._recycler = options.recycle ? new Recycler(this, options.recycle) : null;
  }

  /** 'idle' | 'starting' | 'ready' | 'restarting' | 'failed' | 'closing' | 'closed' */
  get state() { return this._state; }
  /** True while a worker process is up and has sent `ready`. */
  get ready() { return this._state === 'ready'; }
  /** pid of the current worker process, or null. */
  get pid() { return this._proc?.child.pid ?? null; }
  /** Requests the worker still owes a terminal message for, plus those waiting to be sent. */
  get inFlight() { return this._requests.size; }

  /**
   * Spawns the worker and resolves with the `ready` message. A failure to start (exit before
   * ready, ready timeout) rejects; there is no retry on the first start.
   * @returns {Promise<ReadyMessage>}
   */
  start() {
    if (this._startPromise) return this._startPromise;
    if (this._state === 'closing' || this._state === 'closed') {
      return Promise.reject(new WorkerExitedError('worker closed', { closed: true }));
    }
    this._startPromise = new Promise((resolve, reject) => {
      this._initial = { resolve, reject };
    });
    this._startPromise.catch(noop);
    this._spawn();
    return this._startPromise;
  }

  _spawn() {
    this._state = this._proc === null && this.restarts === 0 ? 'starting' : 'restarting';
    this._proc = this._launch(this.options);
  }

  /** Spawns a worker process with these options; its lines and exit come back through
   * _onLine/_onExit with the returned proc. */
  _launch(o) {
    const args = ['-m', 'worker'];
    if (o.model) args.push('--model', String(o.model));
    if (o.adapter) args.push('--adapter', String(o.adapter));
    args.push(...o.args.map(String));

    const child = spawn(o.python, args, {
      cwd: o.cwd,
      env: { ...process.env, PYTHONUNBUFFERED: '1', ...(o.env ?? {}) },
      stdio: ['pipe', 'pipe', 'pipe'],
      windowsHide: true,
    });
    const proc = {
      child,
      ready: false,
      exited: false,
      out: [], // lines waiting to be written
      blocked: false,
      readyTimer: null,
      spawnError: null,
      statsWaiters: [],
      stderrTail: [],
    };
    trackChild(child);

    const lines = new LineSplitter();
    child.stdout.on('data', (chunk) => {
      for (const line of lines.push(chunk)) this._onLine(proc, line);
    });
    child.stdout.on('end', () => {
      for (const line of lines.end()) this._onLine(proc, line);
    });
    const errLines = new LineSplitter();
    const onErrLine = (line) => {
      proc.stderrTail.push(line);
      if (proc.stderrTail.length > 20) proc.stderrTail.shift();
      this.emit('stderr', line);
    };
    child.stderr.on('data', (chunk) => { for (const l of errLines.push(chunk)) onErrLine(l); });
    child.stderr.on('end', () => { for (const l of errLines.end()) onErrLine(l); });
    child.stdin.on('error', noop); // EPIPE when the worker dies; handled through 'close'
    child.stdout.on('error', noop);
    child.stderr.on('error', noop);
    child.stdin.on('drain', () => {
      proc.blocked = false;
      this._flush(proc);
    });

    let finalized = false;
    const finalize = (code, signal) => {
      if (finalized) return;
      finalized = true;
      this._onExit(proc, code, signal);
    };
    child.on('error', (err) => {
      proc.spawnError = err;
      this._emitError(new WorkerError('spawn_failed', `worker process error: ${err.message}`, { cause: err }));
      // A spawn failure may not be followed by 'close'.
      if (child.pid === undefined) setImmediate(() => finalize(null, null));
    });
    child.on('close', (code, signal) => finalize(code, signal));

    proc.readyTimer = setTimeout(() => {
      if (!proc.ready && !proc.exited) {
        proc.readyTimeout = true;
        try { child.kill('SIGKILL'); } catch { /* gone */ }
      }
    }, o.readyTimeoutMs);
    proc.readyTimer.unref?.();
    return proc;
  }

  /** @param {any} err */
  _emitError(err) {
    if (this.listenerCount('error') > 0) this.emit('error', err);
  }

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
    if (proc !== this._proc && !this._retiring.has(proc) && proc !== this._candidate?.proc) return;
    this.emit('message', msg);
    switch (msg.type) {
      case 'ready': return proc === this._candidate?.proc ? this._onCandidateReady(proc, msg) : this._onReady(proc, msg);
      case 'token': {
        const r = this._requests.get(msg.id);
        if (r && r.proc === proc && !r.settled && r.onToken) r.onToken(msg);
        return;
      }
      case 'done': {
        const r = this._requests.get(msg.id);
        if (!r || r.proc !== proc) return;
        this._finish(r);
        r.onDone(msg);
        return;
      }
      case 'error': {
        const err = new WorkerError(String(msg.code), String(msg.message), { id: msg.id ?? null });
        const r = msg.id != null ? this._requests.get(msg.id) : undefined;
        if (r && r.proc === proc) {
          this._finish(r);
          r.onError(err);
        } else {
          this._emitError(err);
        }
        return;
      }
      case 'pong': {
        const w = msg.id != null ? this._pings.get(msg.id) : undefined;
        if (w) w.resolve(msg);
        return;
      }
      case 'stats': {
        const w = proc.statsWaiters.shift();
        if (w) w.resolve(msg);
        return;
      }
      default:
        this._emitError(new WorkerError('protocol', `unknown message type ${JSON.stringify(msg.type)}`));
    }
  }

  /** Marks proc ready; false if it already was. */
  _markReady(proc, msg) {
    if (proc.ready) return false;
    if (msg.protocol !== PROTOCOL_VERSION) {
      this._emitError(new WorkerError('protocol', `worker speaks protocol ${msg.protocol}, client ${PROTOCOL_VERSION}`));
    }
    proc.ready = true;
    clearTimeout(proc.readyTimer);
    return true;
  }

  _onReady(proc, msg) {
    if (!this._markReady(proc, msg)) return;
    this.info = msg;
    this._failures = 0;
    if (this._state === 'closing' || this._state === 'closed') return;
    this._state = 'ready';
    this.emit('ready', msg);
    if (this._initial) {
      this._initial.resolve(msg);
      this._initial = null;
    }
    for (const r of [...this._waiting]) this._dispatch(r);
    for (const w of [...this._controlWaiting]) w.send();
  }

  _onExit(proc, code, signal) {
    proc.exited = true;
    clearTimeout(proc.readyTimer);
    clearTimeout(proc.killTimer);
    liveChildren.delete(proc.child);
    proc.out = [];
    const pid = proc.child.pid ?? null;
    const current = this._proc === proc;
    if (current) this._proc = null;
    this.emit('exit', { code, signal, pid });

    const how = proc.spawnError
      ? `could not be started (${proc.spawnError.message})`
      : proc.readyTimeout
        ? `did not become ready within ${this.options.readyTimeoutMs} ms and was killed`
        : signal ? `was killed by signal ${signal}` : `exited with code ${code}`;
    const closing = this._state === 'closing' || this._state === 'closed';
    const tail = proc.stderrTail.slice(-3).join(' | ');
    const message = `worker process ${pid ?? ''} ${how}`.replace(/\s+/g, ' ') + (tail && !proc.ready ? `; stderr: ${tail}` : '');
    const mkErr = (id) => new WorkerExitedError(message, { id, exitCode: code, signal, closed: closing });

    // Requests sent to this process can no longer finish.
    for (const r of [...this._requests.values()]) {
      if (r.proc !== proc) continue;
      this._finish(r);
      r.onError(mkErr(r.id));
    }
    for (const w of this._pings.values()) if (w.proc === proc) w.reject(mkErr(w.id));
    for (const w of proc.statsWaiters.splice(0)) w.reject(mkErr(null));

    this._retiring.delete(proc);
    if (this._candidate?.proc === proc) {
      this._candidate.onFail(new WorkerError('reload_failed', `reload: the new ${message}`));
      return;
    }
    if (closing || !current) return;

    if (this._initial) {
      // The first start failed: report it, no retry.
      this._state = 'failed';
      this._initial.reject(mkErr(null));
      this._initial = null;
      this._failWaiting(mkErr(null));
      return;
    }

    this._restartAfter(proc, message, code, signal);
  }

  /** The current process died (not closing): restart with backoff, or give up. */
  _restartAfter(proc, message, code, signal) {
    if (!proc.ready) this._failures += 1;
    const maxRetries = this.options.restart.maxRetries;
    if (this._failures >= maxRetries) {
      this._state = 'failed';
      const err = new WorkerExitedError(
        `worker gave up restarting after ${this._failures} consecutive failed restart(s) (maxRetries ${maxRetries}); last: ${message}`,
        { exitCode: code, signal });
      this._failWaiting(err);
      this._emitError(err);
      return;
    }
    const delayMs = backoffDelay(this._failures, this.options.restart);
    this._state = 'restarting';
    this.restarts += 1;
    this.emit('restart', { attempt: this._failures + 1, delayMs, code, signal });
    this._restartTimer = setTimeout(() => {
      this._restartTimer = null;
      if (this._state === 'restarting') this._spawn();
    }, delayMs);
  }

  _failWaiting(err) {
    for (const r of [...this._waiting]) {
      this._finish(r);
      r.onError(err);
    }
    for (const w of [...this._controlWaiting]) w.reject(err);
  }

  /** Drops a request from the bookkeeping (it got, or will never get, its terminal message). */
  _finish(r) {
    this._requests.delete(r.id);
    this._waiting.delete(r);
    clearTimeout(r.queueTimer);
    if (r.proc && this._retiring.size > 0) this._stopIfIdle(r.proc);
  }

  _write(proc, obj) {
    if (!proc || proc.exited) return false;
    this.emit('send', obj);
    proc.out.push(JSON.stringify(obj) + '\n');
    this._flush(proc);
    return true;
  }

  _flush(proc) {
    const stdin = proc.child.stdin;
    while (!proc.blocked && proc.out.length > 0 && !proc.exited) {
      if (!stdin.writable) { proc.out = []; return; }
      const line = proc.out.shift();
      if (!stdin.write(line)) {
        proc.blocked = true; // wait for 'drain'
        this.backpressureWaits += 1;
      }
    }
  }

  _nextId() {
    this._counter += 1;
    return `${this._prefix}-${this._counter}`;
  }

  /**
   * Registers a generation request. `handlers`: onToken, onDone, onError (called once),
   * onAbort (called when the signal fires).
   */
  _submit(payload) {
    if (payload === null || typeof payload !== 'object' || Array.isArray(payload)) {
      throw new TypeError('request must be an object with messages or prompt');
    }
    const id = this._nextId();
    const { id: _ignored, ...rest } = payload;
    const r = {
      id,
      body: { ...rest, id },
      proc: null,
      settled: false,
      onToken: null,
      onDone: noop,
      onError: noop,
      queueTimer: null,
    };
    return r;
  }

  /** Sends r now if a ready process exists, else queues it until ready (bounded). */
  _dispatch(r) {
    const proc = this._proc;
    if (this._state === 'closing' || this._state === 'closed') {
      this._finish(r);
      r.onError(new WorkerExitedError('worker closed', { id: r.id, closed: true }));
      return;
    }
    if (this._state === 'failed' && !this._initial) {
      this._finish(r);
      r.onError(new WorkerExitedError('worker is not running (gave up restarting)', { id: r.id }));
      return;
    }
    if (!proc || !proc.ready) {
      this._requests.set(r.id, r);
      if (!this._waiting.has(r)) {
        this._waiting.add(r);
        r.queueTimer = setTimeout(() => {
          if (!this._waiting.has(r)) return;
          this._finish(r);
          r.onError(new TimeoutError(`worker not ready within ${this.options.queueTimeoutMs} ms`, { id: r.id }));
        }, this.options.queueTimeoutMs);
        r.queueTimer.unref?.();
      }
      return;
    }
    this._waiting.delete(r);
    clearTimeout(r.queueTimer);
    const line = JSON.stringify(r.body);
    if (hasLoneSurrogate(r.body)) {
      this._finish(r);
      r.onError(new WorkerError('invalid_request', 'request text contains a lone UTF-16 surrogate (not valid Unicode)', { id: r.id }));
      return;
    }
    const maxBytes = this.info?.max_line_bytes;
    if (maxBytes && Buffer.byteLength(line) + 1 > maxBytes) {
      this._finish(r);
      r.onError(new WorkerError('too_large',
        `request is ${Buffer.byteLength(line) + 1} bytes, over the worker's max_line_bytes (${maxBytes})`, { id: r.id }));
      return;
    }
    r.proc = proc;
    this._requests.set(r.id, r);
    this._write(proc, r.body);
  }

  /** Sends a cancel for r if it was sent; drops it if it was still waiting. @returns {boolean} sent */
  _cancel(r) {
    if (r.proc && !r.proc.exited && this._requests.get(r.id) === r) {
      this._write(r.proc, { op: 'cancel', id: r.id });
      return true;
    }
    if (this._waiting.has(r) || (this._requests.get(r.id) === r && !r.proc)) {
      this._finish(r);
    }
    return false;
  }

  /**
   * Common plumbing for complete() and stream(): timeout + abort signal.
   * @returns {{ cleanup: () => void, timeoutMs: number | undefined }}
   */
  _track(r, opts, onAbort, onTimeout) {
    const signal = opts.signal;
    const timeoutMs = opts.timeoutMs ?? this.options.requestTimeoutMs;
    let timer = null;
    const abortListener = () => onAbort(signal.reason);
    if (signal) signal.addEventListener('abort', abortListener, { once: true });
    if (timeoutMs != null && Number.isFinite(timeoutMs)) {
      timer = setTimeout(onTimeout, timeoutMs);
    }
    const cleanup = () => {
      clearTimeout(timer);
      if (signal) signal.removeEventListener('abort', abortListener);
    };
    return { cleanup, timeoutMs };
  }

  /**
   * Generates a reply and resolves with the worker's `done` message.
   * Abort: sends `cancel` to the worker and rejects at once with an AbortError (the worker's
   * `done` with finish_reason 'cancelled' is still observable through the 'message' event).
   * Timeout: cancels in the worker and rejects with a TimeoutError.
   * @param {GenerateRequest} request
   * @param {RequestOptions} [opts]
   * @returns {Promise<DoneMessage>}
   */
  complete(request, opts = {}) {
    return new Promise((resolve, reject) => {
      let r;
      try {
        r = this._submit({ ...request, stream: false });
      } catch (err) {
        reject(err);
        return;
      }
      if (opts.signal?.aborted) {
        reject(new AbortError(undefined, { id: r.id, cause: opts.signal.reason }));
        return;
      }
      let tracked;
      const settle = (fn, value) => {
        if (r.settled) return;
        r.settled = true;
        tracked.cleanup();
        fn(value);
      };
      r.onDone = (msg) => settle(resolve, msg);
      r.onError = (err) => settle(reject, err);
      tracked = this._track(r, opts,
        (reason) => {
          if (r.settled) return;
          this._cancel(r);
          settle(reject, new AbortError(undefined, { id: r.id, cause: reason }));
        },
        () => {
          if (r.settled) return;
          this._cancel(r);
          settle(reject, new TimeoutError(`request ${r.id} timed out after ${tracked.timeoutMs} ms`, { id: r.id }));
        });
      this._dispatch(r);
    });
  }

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
  stream(request, opts = {}) {
    const r = this._submit({ ...request, stream: true });
    const tokens = new AsyncQueue();
    const done = deferred();
    let tracked;
    const settle = () => { r.settled = true; tracked?.cleanup(); };
    const stopEarly = (reason) => {
      // abort or break: cancel in the worker, end the iteration now; .done waits for the
      // worker's cancelled `done` (or rejects at once if the request was never sent)
      if (r.settled || tokens.ended) return;
      tokens.close();
      tracked?.cleanup();
      if (!this._cancel(r)) {
        settle();
        done.reject(new AbortError(undefined, { id: r.id, cause: reason }));
      }
    };
    r.onToken = (msg) => {
      if (tokens.ended) return;
      opts.onToken?.(msg);
      tokens.push(msg.text);
    };
    r.onDone = (msg) => {
      if (r.settled) return;
      settle();
      done.resolve(msg);
      tokens.end(msg);
    };
    r.onError = (err) => {
      if (r.settled) return;
      settle();
      done.reject(err);
      tokens.fail(err);
    };
    const iterator = {
      next: () => tokens.next(),
      return: async (value) => {
        stopEarly(new AbortError('stream closed by the consumer', { id: r.id }));
        tokens.close();
        return { value, done: true };
      },
      [Symbol.asyncIterator]() { return this; },
    };
    const result = {
      id: r.id,
      done: done.promise,
      cancel: () => stopEarly(new AbortError('stream cancelled', { id: r.id })),
      [Symbol.asyncIterator]: () => iterator,
    };
    if (opts.signal?.aborted) {
      settle();
      tokens.close();
      done.reject(new AbortError(undefined, { id: r.id, cause: opts.signal.reason }));
      return result;
    }
    tracked = this._track(r, opts, stopEarly, () => {
      if (r.settled) return;
      this._cancel(r); // r stays tracked (if it was sent) until the worker's cancelled `done`
      r.onError(new TimeoutError(`request ${r.id} timed out after ${tracked.timeoutMs} ms`, { id: r.id }));
    });
    this._dispatch(r);
    return result;
  }

  /**
   * Round trip to the worker. Resolves with the latency in ms.
   * @param {{ timeoutMs?: number }} [opts]
   * @returns {Promise<number>}
   */
  ping(opts = {}) {
    const timeoutMs = opts.timeoutMs ?? 10_000;
    const id = `${this._nextId()}-ping`;
    return this._control({ op: 'ping', id }, timeoutMs, (w) => {
      this._pings.set(id, w);
      return () => this._pings.delete(id);
    });
  }

  /**
   * Asks the worker for its `stats` message.
   * @param {{ timeoutMs?: number }} [opts]
   * @returns {Promise<StatsMessage>}
   */
  stats(opts = {}) {
    const timeoutMs = opts.timeoutMs ?? 10_000;
    return this._control({ op: 'stats' }, timeoutMs, (w) => {
      const waiters = w.proc.statsWaiters;
      waiters.push(w);
      return () => {
        const i = waiters.indexOf(w);
        if (i !== -1) waiters.splice(i, 1);
      };
    }, true);
  }

  _control(body, timeoutMs, register, returnMessage = false) {
    return new Promise((resolve, reject) => {
      const started = performance.now();
      let unregister = noop;
      let timer;
      const w = {
        id: body.id ?? null,
        proc: null,
        resolve: (msg) => { w.settle(); resolve(returnMessage ? msg : performance.now() - started); },
        reject: (err) => { w.settle(); reject(err); },
        settle: () => {
          clearTimeout(timer);
          unregister();
          if (w.proc) this._stopIfIdle(w.proc); // a reload's old process waits for its replies
        },
      };
      timer = setTimeout(() => w.reject(new TimeoutError(`${body.op} timed out after ${timeoutMs} ms`, { id: w.id })), timeoutMs);
      w.send = () => {
        const proc = this._proc;
        if (this._state === 'closing' || this._state === 'closed') {
          w.reject(new WorkerExitedError('worker closed', { closed: true }));
          return;
        }
        if (!proc || !proc.ready) {
          if (this._state === 'failed') { w.reject(new WorkerExitedError('worker is not running (gave up restarting)')); return; }
          this._controlWaiting.add(w);
          unregister = () => this._controlWaiting.delete(w);
          return;
        }
        unregister();
        w.proc = proc;
        unregister = register(w);
        this._write(proc, body);
      };
      w.send();
    });
  }

  /**
   * Shuts the worker down: pending requests reject with WorkerExitedError (closed: true),
   * `{"op":"shutdown"}` is sent and stdin ended, then after `graceMs` (default
   * closeGraceMs, 3 s) the process is SIGKILLed. Resolves once the process is gone (and a
   * reload's new or old processes too). Idempotent; no restart afterwards.
   * @param {{ graceMs?: number }} [opts]
   * @returns {Promise<void>}
   */
  close(opts = {}) {
    if (this._closePromise) return this._closePromise;
    const graceMs = opts.graceMs ?? this.options.closeGraceMs;
    this._state = 'closing';
    this._recycler?.stop();
    clearTimeout(this._restartTimer);
    this._restartTimer = null;
    const closedErr = (id) => new WorkerExitedError('worker closed', { id, closed: true });
    if (this._initial) {
      this._initial.reject(closedErr(null));
      this._initial = null;
    }
    for (const r of [...this._requests.values()]) {
      this._finish(r);
      r.onError(closedErr(r.id));
    }
    for (const w of [...this._pings.values()]) w.reject(closedErr(w.id));
    for (const w of [...this._controlWaiting]) w.reject(closedErr(null));
    const candidate = this._candidate;
    if (candidate) candidate.onFail(closedErr(null));
    const procs = [this._proc, candidate?.proc, ...this._retiring].filter(Boolean);
    this._closePromise = Promise.all(procs.map((p) => this._stopProc(p, graceMs)))
      .then(() => { this._state = 'closed'; });
    return this._closePromise;
  }

  /**
   * Ends one process: `{"op":"shutdown"}` now (whatever the backpressure state: the stream
   * buffers it), then EOF, then SIGKILL after graceMs. Resolves once it is gone.
   */
  _stopProc(proc, graceMs = this.options.closeGraceMs) {
    for (const w of proc.statsWaiters.splice(0)) w.reject(new WorkerExitedError('worker closed', { closed: true }));
    if (proc.exited) return Promise.resolve();
    if (proc.stopped) return proc.stopped;
    const child = proc.child;
    proc.stopped = new Promise((resolve) => {
      child.once('close', () => resolve());
      try {
        proc.out = [];
        if (child.stdin.writable) {
          const shutdown = { op: 'shutdown' };
          this.emit('send', shutdown);
          child.stdin.write(JSON.stringify(shutdown) + '\n');
          child.stdin.end();
        }
      } catch { /* stdin gone */ }
      proc.killTimer = setTimeout(() => {
        try { child.kill('SIGKILL'); } catch { /* gone */ }
      }, graceMs);
    });
    return proc.stopped;
  }

  // ------------------------------------------------------------------ reload

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
  prepareReload(change = {}) {
    if (this._state === 'closing' || this._state === 'closed') {
      return Promise.reject(new WorkerExitedError('worker closed', { closed: true }));
    }
    if (this._candidate) return Promise.reject(new WorkerError('reload_failed', 'reload: another reload is in progress'));
    const options = { ...this.options };
    for (const key of ['adapter', 'model']) {
      if (change[key] !== undefined) options[key] = change[key] ?? undefined;
    }
    return new Promise((resolve, reject) => {
      const candidate = { options, proc: null };
      candidate.onReady = (msg) => resolve({
        ready: msg,
        commit: () => this._commitReload(candidate, msg),
        abort: () => this._abortReload(candidate),
      });
      candidate.onFail = (err) => {
        if (this._candidate === candidate) this._candidate = null;
        reject(err);
      };
      this._candidate = candidate;
      candidate.proc = this._launch(options);
    });
  }

  _onCandidateReady(proc, msg) {
    if (this._markReady(proc, msg)) this._candidate.onReady(msg);
  }

  _commitReload(candidate, msg) {
    if (this._candidate !== candidate || candidate.proc.exited) {
      throw new WorkerError('reload_failed', 'reload: the new worker process is gone or the reload was aborted');
    }
    this._candidate = null;
    const old = this._proc;
    const from = this.info;
    clearTimeout(this._restartTimer);
    this._restartTimer = null;
    this.options = candidate.options;
    this._proc = candidate.proc;
    this.info = msg;
    this._failures = 0;
    this._state = 'ready';
    this.reloads += 1;
    if (old) this._retire(old);
    this.emit('reload', { from, to: msg });
    this.emit('ready', msg);
    for (const r of [...this._waiting]) this._dispatch(r);
    for (const w of [...this._controlWaiting]) w.send();
    return msg;
  }

  _abortReload(candidate) {
    if (this._candidate === candidate) this._candidate = null;
    return this._stopProc(candidate.proc);
  }

  /** The old process of a reload: stopped once its last request has its terminal message. */
  _retire(proc) {
    if (proc.exited) return;
    this._retiring.add(proc);
    this._stopIfIdle(proc);
  }

  _stopIfIdle(proc) {
    if (!this._retiring.has(proc) || proc.stopped) return;
    for (const r of this._requests.values()) if (r.proc === proc) return;
    for (const w of this._pings.values()) if (w.proc === proc) return;
    if (proc.statsWaiters.length > 0) return;
    this._stopProc(proc);
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
