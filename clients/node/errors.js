// Errors of the worker client: a WorkerError carries the protocol's error code.


/** A failure reported by (or about) the worker. `code` is the protocol error code. */
export class WorkerError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {{ id?: string | null, cause?: unknown }} [extra]
   */
  constructor(code, message, extra = {}) {
    super(message, extra.cause === undefined ? undefined : { cause: extra.cause });
    this.name = 'WorkerError';
    /** @type {string} */
    this.code = code;
    /** @type {string | null} */
    this.id = extra.id ?? null;
  }
}

/** The request did not finish within its timeout; it was cancelled in the worker. */
export class TimeoutError extends WorkerError {
  /** @param {string} message @param {{ id?: string | null }} [extra] */
  constructor(message, extra = {}) {
    super('timeout', message, extra);
    this.name = 'TimeoutError';
  }
}

/** The worker process exited (crash, kill, or close()) while the request was pending. */
export class WorkerExitedError extends WorkerError {
  /**
   * @param {string} message
   * @param {{ id?: string | null, exitCode?: number | null, signal?: string | null, closed?: boolean }} [extra]
   */
  constructor(message, extra = {}) {
    super('worker_exited', message, extra);
    this.name = 'WorkerExitedError';
    /** @type {number | null} */
    this.exitCode = extra.exitCode ?? null;
    /** @type {string | null} */
    this.signal = extra.signal ?? null;
    /** True when the worker was closed with close(). */
    this.closed = Boolean(extra.closed);
  }
}

/** The request was aborted through its AbortSignal. */
export class AbortError extends Error {
  /** @param {string} [message] @param {{ id?: string | null, cause?: unknown }} [extra] */
  constructor(message = 'The operation was aborted', extra = {}) {
    super(message, extra.cause === undefined ? undefined : { cause: extra.cause });
    this.name = 'AbortError';
    this.code = 'ABORT_ERR';
    /** @type {string | null} */
    this.id = extra.id ?? null;
  }
}
