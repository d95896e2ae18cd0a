// Node client for the NDJSON inference worker (`python -m worker`), protocol v2.
// Contract: docs/PROTOCOL.md and docs/protocol.schema.json at the repository root.
// No runtime dependencies. One module per concern:
//   errors.js     WorkerError and its kinds     lines.js    splitting stdout/stderr into lines
//   queue.js      the async queue behind stream()
//   process.js    one worker process: spawn, lines, stdin with backpressure, stop
//   supervisor.js start, ready, exit, restart with backoff, close
//   requests.js   the request table: ids, dispatch, cancel, replies routed by id
//   calls.js      complete(), stream(), ping(), stats(): timeouts, abort, settled once
//   reload.js     the zero-downtime switch      recycle.js  optional recycling (through reload)
//   worker.js     the Worker: options, events, messages routed to the above
//   pool.js       N workers behind one API
export { WorkerError, TimeoutError, WorkerExitedError, AbortError } from './errors.js';
export { LineSplitter } from './lines.js';
export { AsyncQueue } from './queue.js';
export { REPO_ROOT, PROTOCOL_VERSION, defaultPython } from './process.js';
export { backoffDelay } from './supervisor.js';
export { Worker, createWorker, startWorker } from './worker.js';
export { Pool, startPool } from './pool.js';
