// The calls on the request table (requests.js): complete() and stream() for generation,
// ping() and stats() for control. Each registers its waiter, adds its timeout and abort
// signal, and settles exactly once (reply, error, timeout, abort, process exit or close).
import { AbortError, TimeoutError, WorkerExitedError } from './errors.js';
import { AsyncQueue } from './queue.js';

const noop = () => {};

/** A promise with its resolve/reject; rejections are handled (callers need not await it). */
function deferred() {
  const d = {};
  d.promise = new Promise((resolve, reject) => { d.resolve = resolve; d.reject = reject; });
  d.promise.catch(noop);
  return d;
}

/**
 * A request's timeout and abort signal: onAbort(reason) when the signal fires, onTimeout()
 * after opts.timeoutMs (default requestTimeoutMs, none if unset).
 * @returns {{ cleanup: () => void, timeoutMs: number | undefined }}
 */
function track(table, opts, onAbort, onTimeout) {
  const signal = opts.signal;
  const timeoutMs = opts.timeoutMs ?? table.w.options.requestTimeoutMs;
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

const timedOut = (r, tracked) => new TimeoutError(`request ${r.id} timed out after ${tracked.timeoutMs} ms`, { id: r.id });

/**
 * See Worker.complete: resolves with the `done` message; abort and timeout cancel in the
 * worker and reject at once.
 * @param {import('./requests.js').RequestTable} table
 * @returns {Promise<import('./index.d.ts').DoneMessage>}
 */
export function complete(table, request, opts = {}) {
  return new Promise((resolve, reject) => {
    let r;
    try {
      r = table.submit({ ...request, stream: false });
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
    tracked = track(table, opts,
      (reason) => {
        if (r.settled) return;
        table.cancel(r);
        settle(reject, new AbortError(undefined, { id: r.id, cause: reason }));
      },
      () => {
        if (r.settled) return;
        table.cancel(r);
        settle(reject, timedOut(r, tracked));
      });
    table.dispatch(r);
  });
}

/**
 * See Worker.stream: an async iterable of token texts (an AsyncQueue fed by the worker's
 * token messages) and `.done`. Abort or break cancels in the worker: the iteration ends at
 * once, `.done` waits for the worker's cancelled `done`.
 * @param {import('./requests.js').RequestTable} table
 * @returns {import('./index.d.ts').CompletionStream}
 */
export function stream(table, request, opts = {}) {
  const r = table.submit({ ...request, stream: true });
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
    if (!table.cancel(r)) {
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
  tracked = track(table, opts, stopEarly, () => {
    if (r.settled) return;
    table.cancel(r); // r stays tracked (if it was sent) until the worker's cancelled `done`
    r.onError(timedOut(r, tracked));
  });
  table.dispatch(r);
  return result;
}

/**
 * A control message (ping, stats): sent to the ready process, or queued until there is one
 * (failing at once if closing or given up). register(waiter) files the waiter where the
 * reply is routed (requests.js) and returns how to remove it.
 */
function control(table, body, timeoutMs, register, returnMessage = false) {
  return new Promise((resolve, reject) => {
    const started = performance.now();
    let unregister = noop;
    let timer;
    const c = {
      id: body.id ?? null,
      proc: null,
      resolve: (msg) => { c.settle(); resolve(returnMessage ? msg : performance.now() - started); },
      reject: (err) => { c.settle(); reject(err); },
      settle: () => {
        clearTimeout(timer);
        unregister();
        if (c.proc) table.w._reload.stopIfIdle(c.proc); // a reload's old process waits for its replies
      },
    };
    timer = setTimeout(() => c.reject(new TimeoutError(`${body.op} timed out after ${timeoutMs} ms`, { id: c.id })), timeoutMs);
    c.send = () => {
      const sup = table.w._sup;
      const proc = sup.proc;
      if (sup.closing) {
        c.reject(new WorkerExitedError('worker closed', { closed: true }));
        return;
      }
      if (!proc || !proc.ready) {
        if (sup.state === 'failed') { c.reject(new WorkerExitedError('worker is not running (gave up restarting)')); return; }
        table.controlWaiting.add(c);
        unregister = () => table.controlWaiting.delete(c);
        return;
      }
      unregister();
      c.proc = proc;
      unregister = register(c);
      proc.write(body);
    };
    c.send();
  });
}

/** See Worker.ping: resolves with the round trip in ms. */
export function ping(table, opts = {}) {
  const timeoutMs = opts.timeoutMs ?? 10_000;
  const id = `${table.nextId()}-ping`;
  return control(table, { op: 'ping', id }, timeoutMs, (c) => {
    table.pings.set(id, c);
    return () => table.pings.delete(id);
  });
}

/** See Worker.stats: resolves with the worker's `stats` message. */
export function stats(table, opts = {}) {
  const timeoutMs = opts.timeoutMs ?? 10_000;
  return control(table, { op: 'stats' }, timeoutMs, (c) => {
    const waiters = c.proc.statsWaiters;
    waiters.push(c);
    return () => {
      const i = waiters.indexOf(c);
      if (i !== -1) waiters.splice(i, 1);
    };
  }, true);
}
