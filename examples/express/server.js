// Starts the example: `node examples/express/server.js`
// Environment: PORT (3000), HOST (127.0.0.1), MODEL, ADAPTER (default MODEL: models/tiny-mistral
// when neither is set), PYTHON (default <repo>/.venv/bin/python), TIMEOUT_MS (120000),
// ALLOW_CLIENT_SYSTEM=1 (accept client `system` messages), MODEL_ID (the OpenAI model name,
// 'farense'), ADMIN_TOKEN (enables POST /admin/reload), FOLLOW_INTERVAL_MS (2000), WORKER_ARGS
// (extra worker options, space-separated), RATE_LIMIT_PER_MINUTE (30) and RATE_LIMIT_CONCURRENT
// (2): per-client limits on the generation routes (0: none), TRUST_PROXY (off: see limits.js
// and README.md, for a server behind nginx).
// The HTTP server listens at once; /healthz answers 503 until the worker is ready.
// Reloads (zero downtime, see clients/node reload()): SIGHUP, POST /admin/reload, and when
// ADAPTER (or MODEL) is a symlink such as models/current whose target changes.
import { existsSync, lstatSync, realpathSync } from 'node:fs';
import path from 'node:path';
import { createWorker, REPO_ROOT } from '../../clients/node/index.js';
import { createApp, defaultLog as log } from './app.js';
import { DEFAULT_LIMITS, parseTrustProxy } from './limits.js';

/** A path that exists relative to the current directory is made absolute; anything else
 * (a path relative to the repo root, a Hugging Face id) is passed to the worker as is. */
function modelArg(value) {
  if (!value) return undefined;
  const abs = path.resolve(process.cwd(), value);
  return existsSync(abs) ? abs : value;
}

const port = Number.parseInt(process.env.PORT ?? '3000', 10);
const host = process.env.HOST || '127.0.0.1';
const adapterPath = modelArg(process.env.ADAPTER);
const modelPath = modelArg(process.env.MODEL) ?? (adapterPath ? undefined : path.join(REPO_ROOT, 'models', 'tiny-mistral'));
const timeoutMs = Number.parseInt(process.env.TIMEOUT_MS ?? '120000', 10);

/** A whole number >= 0 from the environment, or exit naming the variable. */
function count(name, fallback) {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  if (!/^\d+$/.test(raw.trim())) {
    log('error', `${name} must be a whole number >= 0 (0: no limit), not ${JSON.stringify(raw)}`);
    process.exit(2);
  }
  return Number(raw);
}
let trustProxy;
try {
  trustProxy = parseTrustProxy(process.env.TRUST_PROXY);
} catch (err) {
  log('error', err.message);
  process.exit(2);
}
const limits = {
  perMinute: count('RATE_LIMIT_PER_MINUTE', DEFAULT_LIMITS.perMinute),
  concurrent: count('RATE_LIMIT_CONCURRENT', DEFAULT_LIMITS.concurrent),
};

/** A symlink (models/current) is followed: the worker gets its target, re-read at each reload. */
function resolveLink(p) {
  if (!p) return undefined;
  try {
    return lstatSync(p).isSymbolicLink() ? realpathSync(p) : p;
  } catch {
    return p;
  }
}
const target = () => ({ adapter: resolveLink(adapterPath), model: resolveLink(modelPath) });

const worker = createWorker({
  python: process.env.PYTHON || undefined,
  ...target(),
  args: (process.env.WORKER_ARGS ?? '').split(' ').filter(Boolean),
});
worker.on('stderr', (line) => process.stderr.write(`[worker] ${line}\n`));
worker.on('exit', ({ code, signal, pid }) => log('warn', 'worker exited', { pid, code, signal }));
worker.on('restart', ({ attempt, delayMs }) => log('warn', 'restarting worker', { attempt, delayMs }));
worker.on('ready', (info) => log('info', 'worker ready', { pid: info.pid, model: info.model, adapter: info.adapter }));
worker.on('error', (err) => log('error', 'worker error', { error: err.message }));

const app = createApp(worker, {
  timeoutMs,
  allowClientSystem: process.env.ALLOW_CLIENT_SYSTEM === '1',
  modelId: process.env.MODEL_ID || 'farense',
  trustProxy,
  limits,
  adminToken: process.env.ADMIN_TOKEN || undefined,
  reload: () => worker.reload(target()),
});
const reload = (why) => app.locals.reload(why).catch(() => {}); // logged by the app
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
process.on('SIGHUP', () => reload('SIGHUP'));

// Follow a symlinked ADAPTER/MODEL (make promote switches models/current atomically).
const followed = [adapterPath, modelPath].filter((p) => p && resolveLink(p) !== p);
if (followed.length > 0) {
  let last = JSON.stringify(target());
  const interval = Number.parseInt(process.env.FOLLOW_INTERVAL_MS ?? '2000', 10);
  setInterval(() => {
    const now = JSON.stringify(target());
    if (now === last || !worker.ready) return;
    last = now;
    reload(`${followed.join(', ')} changed`);
  }, interval).unref();
}
