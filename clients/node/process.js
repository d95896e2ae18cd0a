// One worker process (`python -m worker`): spawned, its stdout and stderr cut into lines, its
// stdin written whole lines with backpressure, stopped (shutdown, EOF, then SIGKILL). What the
// lines mean is worker.js's; what to do when the process is ready or exits is supervisor.js's.
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import { WorkerError } from './errors.js';
import { LineSplitter } from './lines.js';

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
const STDERR_TAIL = 20; // stderr lines kept for the message of a process that exits early

/**
 * Where a process reports to (the Worker builds it): line(proc, text) for each stdout line,
 * stderr(text), exit(proc, code, signal) once, error(err) (spawn failure, protocol version),
 * send(obj) for each object written, blocked() each time a write waits for 'drain'.
 * @typedef {{ line: Function, stderr: Function, exit: Function, error: Function, send: Function, blocked: Function }} ProcessSink
 */

export class WorkerProcess {
  /**
   * Spawns `python -m worker` with these options (python, model, adapter, args, cwd, env,
   * readyTimeoutMs); a process not ready within readyTimeoutMs is killed.
   * @param {import('./index.d.ts').WorkerOptions & { args: string[] }} o
   * @param {ProcessSink} sink
   */
  constructor(o, sink) {
    this.sink = sink;
    this.readyTimeoutMs = o.readyTimeoutMs;
    this.ready = false;
    this.exited = false;
    this.out = []; // lines waiting to be written
    this.blocked = false;
    this.readyTimeout = false;
    this.spawnError = null;
    this.killTimer = null;
    /** stop()'s promise, once asked. */
    this.stopped = null;
    /** The request table's stats waiters for this process, in order (stats replies carry no id). */
    this.statsWaiters = [];
    this.stderrTail = [];

    const args = ['-m', 'worker'];
    if (o.model) args.push('--model', String(o.model));
    if (o.adapter) args.push('--adapter', String(o.adapter));
    args.push(...o.args.map(String));
    this.child = spawn(o.python, args, {
      cwd: o.cwd,
      env: { ...process.env, PYTHONUNBUFFERED: '1', ...(o.env ?? {}) },
      stdio: ['pipe', 'pipe', 'pipe'],
      windowsHide: true,
    });
    trackChild(this.child);
    this._wire();
    this.readyTimer = setTimeout(() => {
      if (!this.ready && !this.exited) {
        this.readyTimeout = true;
        try { this.child.kill('SIGKILL'); } catch { /* gone */ }
      }
    }, o.readyTimeoutMs);
    this.readyTimer.unref?.();
  }

  get pid() { return this.child.pid ?? null; }

  _wire() {
    const { child, sink } = this;
    const lines = new LineSplitter();
    child.stdout.on('data', (chunk) => { for (const l of lines.push(chunk)) sink.line(this, l); });
    child.stdout.on('end', () => { for (const l of lines.end()) sink.line(this, l); });
    const errLines = new LineSplitter();
    const onErrLine = (line) => {
      this.stderrTail.push(line);
      if (this.stderrTail.length > STDERR_TAIL) this.stderrTail.shift();
      sink.stderr(line);
    };
    child.stderr.on('data', (chunk) => { for (const l of errLines.push(chunk)) onErrLine(l); });
    child.stderr.on('end', () => { for (const l of errLines.end()) onErrLine(l); });
    child.stdin.on('error', noop); // EPIPE when the worker dies; handled through 'close'
    child.stdout.on('error', noop);
    child.stderr.on('error', noop);
    child.stdin.on('drain', () => {
      this.blocked = false;
      this.flush();
    });

    let finalized = false;
    const finalize = (code, signal) => {
      if (finalized) return;
      finalized = true;
      this.exited = true;
      clearTimeout(this.readyTimer);
      clearTimeout(this.killTimer);
      liveChildren.delete(child);
      this.out = [];
      sink.exit(this, code, signal);
    };
    child.on('error', (err) => {
      this.spawnError = err;
      sink.error(new WorkerError('spawn_failed', `worker process error: ${err.message}`, { cause: err }));
      // A spawn failure may not be followed by 'close'.
      if (child.pid === undefined) setImmediate(() => finalize(null, null));
    });
    child.on('close', (code, signal) => finalize(code, signal));
  }

  /**
   * Marks the process ready; false if it already was. A protocol version other than this
   * client's is reported (sink.error), not refused.
   */
  markReady(msg) {
    if (this.ready) return false;
    if (msg.protocol !== PROTOCOL_VERSION) {
      this.sink.error(new WorkerError('protocol', `worker speaks protocol ${msg.protocol}, client ${PROTOCOL_VERSION}`));
    }
    this.ready = true;
    clearTimeout(this.readyTimer);
    return true;
  }

  /** Queues one object as a line on stdin; false once the process has exited. */
  write(obj) {
    if (this.exited) return false;
    this.sink.send(obj);
    this.out.push(JSON.stringify(obj) + '\n');
    this.flush();
    return true;
  }

  flush() {
    const stdin = this.child.stdin;
    while (!this.blocked && this.out.length > 0 && !this.exited) {
      if (!stdin.writable) { this.out = []; return; }
      const line = this.out.shift();
      if (!stdin.write(line)) {
        this.blocked = true; // wait for 'drain'
        this.sink.blocked();
      }
    }
  }

  /**
   * Ends the process: `{"op":"shutdown"}` now (whatever the backpressure state: the stream
   * buffers it), then EOF, then SIGKILL after graceMs. Resolves once it is gone.
   * @param {number} graceMs
   */
  stop(graceMs) {
    if (this.exited) return Promise.resolve();
    if (this.stopped) return this.stopped;
    const child = this.child;
    this.stopped = new Promise((resolve) => {
      child.once('close', () => resolve());
      try {
        this.out = [];
        if (child.stdin.writable) {
          const shutdown = { op: 'shutdown' };
          this.sink.send(shutdown);
          child.stdin.write(JSON.stringify(shutdown) + '\n');
          child.stdin.end();
        }
      } catch { /* stdin gone */ }
      this.killTimer = setTimeout(() => {
        try { child.kill('SIGKILL'); } catch { /* gone */ }
      }, graceMs);
    });
    return this.stopped;
  }

  /** How the process ended, in words; with its last stderr lines if it never became ready. */
  describeExit(code, signal) {
    const how = this.spawnError
      ? `could not be started (${this.spawnError.message})`
      : this.readyTimeout
        ? `did not become ready within ${this.readyTimeoutMs} ms and was killed`
        : signal ? `was killed by signal ${signal}` : `exited with code ${code}`;
    const tail = this.stderrTail.slice(-3).join(' | ');
    return `worker process ${this.pid ?? ''} ${how}`.replace(/\s+/g, ' ') + (tail && !this.ready ? `; stderr: ${tail}` : '');
  }
}
