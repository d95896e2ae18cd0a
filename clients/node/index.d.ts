// Types for the worker client (protocol v2, docs/PROTOCOL.md).
import { EventEmitter } from 'node:events';

export declare const REPO_ROOT: string;
export declare const PROTOCOL_VERSION: 2;
export declare function defaultPython(): string;

export type Role = 'system' | 'user' | 'assistant';
export interface ChatMessage { role: Role; content: string; }

/** A generation request without `id` (the client makes ids) and without `stream`. */
export interface GenerateRequest {
  messages?: ChatMessage[];
  prompt?: string;
  max_tokens?: number;
  temperature?: number;
  top_p?: number;
  top_k?: number;
  min_p?: number;
  repetition_penalty?: number;
  stop?: string | string[];
  seed?: number;
  /** When the conversation does not fit the context: leave out the oldest whole turns
   * (`'truncate'`, default; `usage.dropped_messages` says how many messages) or answer
   * `too_long` only (`'error'`). See docs/PROTOCOL.md, "Context window". */
  overflow?: 'truncate' | 'error';
}

export interface RequestOptions {
  /** stream() only: called with each whole `token` message ({type, id, text}) as it arrives,
   * before the iteration yields its text. Not called after abort/break/cancel. */
  onToken?: (msg: TokenMessage) => void;
  /** Aborting sends {"op":"cancel"}; complete() rejects at once with AbortError, stream() ends. */
  signal?: AbortSignal;
  /** Cancels the request in the worker and rejects with TimeoutError. Counts from the call. */
  timeoutMs?: number;
}

export interface RestartOptions {
  /** Gives up after this many consecutive failed restarts (exit or timeout before `ready`); 0 disables restarts. Default 5. */
  maxRetries?: number;
  /** Default 250. */
  baseDelayMs?: number;
  /** Default 10000. */
  maxDelayMs?: number;
}

export interface WorkerOptions {
  /** Default: env PYTHON, else <repo>/.venv/bin/python. */
  python?: string;
  /** --model (path or Hugging Face id). */
  model?: string;
  /** --adapter directory. */
  adapter?: string;
  /** Default: the repository root. */
  cwd?: string;
  /** Merged over process.env. */
  env?: Record<string, string | undefined>;
  /** Extra command-line arguments for `python -m worker`. */
  args?: string[];
  /** Default 180000. */
  readyTimeoutMs?: number;
  /** Default timeout for complete()/stream() (none by default). */
  requestTimeoutMs?: number;
  /** How long a request waits for a ready worker (start/restart). Default 120000. */
  queueTimeoutMs?: number;
  /** close() grace period before SIGKILL. Default 3000. */
  closeGraceMs?: number;
  restart?: RestartOptions;
  /** Replace the worker process (zero-downtime reload, nothing dropped) after a number of
   * requests or above a memory ceiling; off by default (clients/node/recycle.js). */
  recycle?: RecycleOptions;
  /** Observe every raw message from the worker, `ready` included. */
  onMessage?: (msg: WorkerMessage) => void;
  /** Observe every stderr line. */
  onStderr?: (line: string) => void;
}

export interface RecycleOptions {
  /** After this many generation requests sent to one process. */
  maxRequests?: number;
  /** When `stats.memory.resident_bytes` (RSS on CPU; RSS + mlx buffers on Metal/CUDA) reaches this. */
  maxResidentBytes?: number;
  /** How often the memory is read while ready. Default 10000. */
  checkIntervalMs?: number;
}

export interface RecycleEvent {
  reason: 'requests' | 'memory';
  /** Requests sent to the old process (reason 'requests'). */
  requests?: number;
  /** Its memory when it was read (reason 'memory'). */
  residentBytes?: number;
  /** pid of the old and of the new process. */
  from: number | null;
  to: number;
}

export interface ReadyMessage {
  type: 'ready';
  protocol: 2;
  model: string;
  adapter: string | null;
  pid: number;
  max_tokens: number;
  max_tokens_cap?: number;
  max_line_bytes: number;
  context_length?: number | null;
  backend?: string;
  blas?: string | null;
  version?: string;
  [k: string]: unknown;
}
export interface TokenMessage { type: 'token'; id: string; text: string; }
export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  cached_tokens?: number;
  /** Messages the worker's context policy left out (0 when the conversation fit). */
  dropped_messages?: number;
}
export interface Timing { queue_ms: number; ttft_ms: number | null; total_ms: number; tokens_per_s: number; }
export interface DoneMessage {
  type: 'done';
  id: string;
  text: string;
  finish_reason: 'stop' | 'length' | 'cancelled';
  usage: Usage;
  timing: Timing;
  /** The model and adapter of the worker that answered (they change across reload()). */
  model: string;
  adapter: string | null;
}
export type ErrorCode =
  | 'bad_json' | 'invalid_request' | 'too_large' | 'too_long' | 'duplicate_id' | 'overloaded' | 'internal';
export interface ErrorMessage { type: 'error'; id: string | null; code: ErrorCode; message: string; }
export interface PongMessage { type: 'pong'; id: string | null; }
export interface StatsMessage {
  type: 'stats';
  in_flight: number;
  queued: number;
  served: number;
  errors?: number;
  tokens_per_s: number;
  prefix_cache: { hits: number; misses: number; entries: number; bytes: number; budget_bytes: number };
  /** resident_bytes: what the process holds (RSS on CPU; RSS + mlx active and cached on Metal/CUDA). */
  memory: {
    rss_bytes: number; active_bytes: number; peak_bytes: number;
    cache_bytes?: number; resident_bytes?: number; resident_source?: 'rss' | 'rss+mlx';
  };
  uptime_s: number;
  [k: string]: unknown;
}
export type WorkerMessage = ReadyMessage | TokenMessage | DoneMessage | ErrorMessage | PongMessage | StatsMessage;

/** Async iterable of token texts; ends after the worker's `done`. */
export interface CompletionStream extends AsyncIterable<string> {
  readonly id: string;
  /** Resolves with the `done` message (finish_reason 'cancelled' after abort/break/cancel). */
  readonly done: Promise<DoneMessage>;
  /** Same as aborting the signal. */
  cancel(): void;
}

export declare class WorkerError extends Error {
  constructor(code: string, message: string, extra?: { id?: string | null; cause?: unknown });
  /** A protocol error code, or 'timeout', 'worker_exited', 'too_large' (checked client-side), 'spawn_failed', 'protocol', 'reload_failed'. */
  code: string;
  id: string | null;
}
export declare class TimeoutError extends WorkerError {
  constructor(message: string, extra?: { id?: string | null });
  code: 'timeout';
}
export declare class WorkerExitedError extends WorkerError {
  constructor(message: string, extra?: { id?: string | null; exitCode?: number | null; signal?: string | null; closed?: boolean });
  code: 'worker_exited';
  exitCode: number | null;
  signal: string | null;
  closed: boolean;
}
export declare class AbortError extends Error {
  constructor(message?: string, extra?: { id?: string | null; cause?: unknown });
  name: 'AbortError';
  code: 'ABORT_ERR';
  id: string | null;
}

export type WorkerState = 'idle' | 'starting' | 'ready' | 'restarting' | 'failed' | 'closing' | 'closed';

export interface WorkerEvents {
  ready: [ReadyMessage];
  exit: [{ code: number | null; signal: string | null; pid: number | null }];
  stderr: [string];
  restart: [{ attempt: number; delayMs: number; code: number | null; signal: string | null }];
  /** After reload(): the old and the new process's `ready` messages. */
  reload: [{ from: ReadyMessage | null; to: ReadyMessage }];
  /** options.recycle replaced the process. */
  recycle: [RecycleEvent];
  message: [WorkerMessage];
  send: [Record<string, unknown>];
  error: [Error];
}

export declare class Worker extends EventEmitter {
  constructor(options?: WorkerOptions);
  readonly options: Required<Omit<WorkerOptions, 'model' | 'adapter' | 'env' | 'requestTimeoutMs' | 'onMessage' | 'onStderr'>> & WorkerOptions;
  readonly state: WorkerState;
  readonly ready: boolean;
  readonly pid: number | null;
  readonly inFlight: number;
  /** The last `ready` message. */
  info: ReadyMessage | null;
  restarts: number;
  /** Successful reload() calls (recycles included). */
  reloads: number;
  /** Processes replaced by options.recycle. */
  recycles: number;
  /** How many times a stdin write had to wait for 'drain'. */
  backpressureWaits: number;
  start(): Promise<ReadyMessage>;
  complete(request: GenerateRequest, opts?: RequestOptions): Promise<DoneMessage>;
  stream(request: GenerateRequest, opts?: RequestOptions): CompletionStream;
  /** Round-trip latency in ms. */
  ping(opts?: { timeoutMs?: number }): Promise<number>;
  stats(opts?: { timeoutMs?: number }): Promise<StatsMessage>;
  close(opts?: { graceMs?: number }): Promise<void>;
  /**
   * Zero-downtime switch: starts a worker process with the new adapter/model (null removes
   * the option), waits for its `ready`, sends new requests there; requests in flight finish
   * on the old process, which then stops. If the new process cannot start, the old one keeps
   * serving and this rejects with a WorkerError, code 'reload_failed', naming the reason.
   * `done.model` / `done.adapter` say which process answered.
   */
  reload(change?: ReloadChange): Promise<ReadyMessage>;
  /** reload() in two steps: resolves once the new process is ready; commit() switches to it,
   * abort() stops it (nothing changed). */
  prepareReload(change?: ReloadChange): Promise<{ ready: ReadyMessage; commit(): ReadyMessage; abort(): Promise<void> }>;
  on<K extends keyof WorkerEvents>(event: K, listener: (...args: WorkerEvents[K]) => void): this;
  once<K extends keyof WorkerEvents>(event: K, listener: (...args: WorkerEvents[K]) => void): this;
  off<K extends keyof WorkerEvents>(event: K, listener: (...args: WorkerEvents[K]) => void): this;
}

export declare class Pool extends EventEmitter {
  constructor(workers: Worker[]);
  readonly workers: Worker[];
  readonly size: number;
  readonly ready: boolean;
  readonly inFlight: number;
  /** The worker the next request would go to (ready first, then fewest in flight). */
  pick(): Worker;
  complete(request: GenerateRequest, opts?: RequestOptions): Promise<DoneMessage>;
  stream(request: GenerateRequest, opts?: RequestOptions): CompletionStream;
  ping(opts?: { timeoutMs?: number }): Promise<number[]>;
  stats(opts?: { timeoutMs?: number }): Promise<StatsMessage[]>;
  close(opts?: { graceMs?: number }): Promise<void>;
  /** Every worker switches (each as Worker.reload), or none: if one new process fails to
   * start, the others are stopped and this rejects with its reason. */
  reload(change?: ReloadChange): Promise<ReadyMessage[]>;
}

export interface ReloadChange { adapter?: string | null; model?: string | null; }

export declare function createWorker(options?: WorkerOptions): Worker;
export declare function startWorker(options?: WorkerOptions): Promise<Worker>;
export declare function startPool(options?: WorkerOptions & { size?: number }): Promise<Pool>;

/** Exported for unit tests. */
export declare class LineSplitter {
  constructor(opts?: { maxLineChars?: number });
  overflows: number;
  push(chunk: Buffer | string): string[];
  end(): string[];
}
/** The queue behind CompletionStream (clients/node/queue.js). */
export declare class AsyncQueue<T> implements AsyncIterator<T> {
  readonly ended: boolean;
  push(value: T): boolean;
  end(value?: unknown): void;
  fail(error: unknown): void;
  close(value?: unknown): void;
  next(): Promise<IteratorResult<T>>;
}
export declare function backoffDelay(attempt: number, opts?: { baseDelayMs?: number; maxDelayMs?: number }): number;
