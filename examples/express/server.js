// Starts the example: `node examples/express/server.js`
// Environment: PORT (3000), HOST (127.0.0.1), MODEL, ADAPTER (default MODEL: models/tiny-mistral
// when neither is set), PYTHON (default <repo>/.venv/bin/python), TIMEOUT_MS (120000).
// The HTTP server listens at once; /healthz answers 503 until the worker is ready.
import { existsSync } from 'node:fs';
import path from 'node:path';
import { createWorker, REPO_ROOT } from '../../clients/node/index.js';
import { createApp, defaultLog as log } from './app.js';

/** A path that exists relative to the current directory is made absolute; anything else
 * (a path relative to the repo root, a Hugging Face id) is passed to the worker as is. */
function modelArg(value) {
  if (!value) return undefined;
  const abs = path.resolve(process.cwd(), value);
  return existsSync(abs) ? abs : value;
}

const port = Number.parseInt(process.env.PORT ?? '3000', 10);
const host = process.env.HOST || '127.0.0.1';
const adapter = modelArg(process.env.ADAPTER);
const model = modelArg(process.env.MODEL) ?? (adapter ? undefined : path.join(REPO_ROOT, 'models', 'tiny-mistral'));
const timeoutMs = Number.parseInt(process.env.TIMEOUT_MS ?? '120000', 10);

const worker = createWorker({ python: process.env.PYTHON || undefined, model, adapter });
worker.on('stderr', (line) => process.stderr.write(`[worker] ${line}\n`));
worker.on('exit', ({ code, signal, pid }) => log('warn', 'worker exited', { pid, code, signal }));
worker.on('restart', ({ attempt, delayMs }) => log('warn', 'restarting worker', { attempt, delayMs }));
worker.on('ready', (info) => log('info', 'worker ready', { pid: info.pid, model: info.model, adapter: info.adapter }));
worker.on('error', (err) => log('error', 'worker error', { error: err.message }));

const app = createApp(worker, { timeoutMs });
const server = app.listen(port, host, () => {
  const { port: actual } = server.address();
  // stdout: one line, parsed by the tests
  process.stdout.write(`listening on http://${host}:${actual}\n`);
});
server.on('error', (err) => {
  log('error', 'cannot listen', { error: err.message });
  shutdown(1);
});

worker.start().catch((err) => {
  log('error', 'worker failed to start', { error: err.message });
  shutdown(1);
});

let stopping = false;
async function shutdown(code = 0) {
  if (stopping) return;
  stopping = true;
  server.close();
  // SSE and keep-alive connections would hold close() open; in-flight generations end as cancelled
  setTimeout(() => server.closeAllConnections?.(), 2_000).unref();
  await worker.close();
  process.exitCode = code;
  setTimeout(() => process.exit(code), 3_000).unref();
}
process.on('SIGINT', () => shutdown(0));
process.on('SIGTERM', () => shutdown(0));
