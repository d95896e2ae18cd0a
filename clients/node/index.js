// Node client for the NDJSON inference worker (`python -m worker`), protocol v2.
// Contract: docs/PROTOCOL.md and docs/protocol.schema.json at the repository root.
// No runtime dependencies. One module per concern:
//   errors.js  WorkerError and its kinds      lines.js  splitting stdout/stderr into lines
//   queue.js   the async queue behind stream() worker.js one worker process (and reload)
//   pool.js    N workers behind one API
export { WorkerError, TimeoutError, WorkerExitedError, AbortError } from './errors.js';
export { LineSplitter } from './lines.js';
export { AsyncQueue } from './queue.js';
export {
  REPO_ROOT, PROTOCOL_VERSION, defaultPython, backoffDelay, Worker, createWorker, startWorker,
} from './worker.js';
export { Pool, startPool } from './pool.js';
