// HTTP load: the Express example vs `mlx_lm server` on the same model, both on their OpenAI
// route (/v1/chat/completions, non-streaming, greedy, the same max_tokens), with autocannon at
// several connection counts; then an overload run against the example (503 + Retry-After,
// and serving again afterwards). Latencies are checked against sequential curl-like requests.
//
//   node examples/express/bench/load.js [--model models/bench-mistral] [--max-tokens 32]
//     [--levels 1,4,8,16] [--duration 10] [--overload 64] [--overload-duration 20]
//     [--max-queue 16] [--out bench/results/load.json]
// (make bench-load). mlx_lm server runs as `python -m bench.anchors server` (the repository's
// BLAS loaded first, as in the worker).
import { spawn } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import path from 'node:path';
import { parseArgs } from 'node:util';
import autocannon from 'autocannon';
import { REPO_ROOT, defaultPython } from '../../../clients/node/index.js';

const PROMPT = 'Quando foi fundado o Sporting Clube Farense?';

function options() {
  const { values } = parseArgs({
    options: {
      model: { type: 'string', default: 'models/bench-mistral' },
      'max-tokens': { type: 'string', default: '32' },
      levels: { type: 'string', default: '1,4,8,16' },
      duration: { type: 'string', default: '10' },
      overload: { type: 'string', default: '64' },
      'overload-duration': { type: 'string', default: '20' },
      'max-queue': { type: 'string', default: '16' },
      out: { type: 'string', default: 'bench/results/load.json' },
    },
  });
  return {
    model: path.resolve(REPO_ROOT, values.model),
    maxTokens: Number(values['max-tokens']),
    levels: values.levels.split(',').map(Number),
    duration: Number(values.duration),
    overload: Number(values.overload),
    overloadDuration: Number(values['overload-duration']),
    maxQueue: Number(values['max-queue']),
    out: path.resolve(REPO_ROOT, values.out),
  };
}

const freePort = () => new Promise((resolve) => {
  const s = createServer().listen(0, '127.0.0.1', () => { const { port } = s.address(); s.close(() => resolve(port)); });
});
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Spawns a server and waits until `healthUrl` answers 200. */
async function startServer(name, cmd, args, env, healthUrl) {
  const child = spawn(cmd, args, { cwd: REPO_ROOT, env: { ...process.env, ...env }, stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d) => { stderr = (stderr + d).slice(-4000); });
  for (let i = 0; i < 3000; i++) {
    if (child.exitCode !== null) throw new Error(`${name} exited: ${stderr}`);
    try {
      if ((await fetch(healthUrl)).status === 200) return child;
    } catch { /* not listening yet */ }
    await sleep(100);
  }
  child.kill('SIGKILL');
  throw new Error(`${name} not ready: ${stderr}`);
}

function stacks(o, ports) {
  const py = defaultPython();
  return {
    express: {
      start: () => startServer('express', process.execPath, [path.join(REPO_ROOT, 'examples/express/server.js')],
        // one load generator on one address: the per-client limits (server.js's defaults) are off
        { PORT: String(ports.express), MODEL: o.model, WORKER_ARGS: `--max-queue ${o.maxQueue}`, RATE_LIMIT_PER_MINUTE: '0', RATE_LIMIT_CONCURRENT: '0' },
        `http://127.0.0.1:${ports.express}/healthz`),
      url: `http://127.0.0.1:${ports.express}/v1/chat/completions`,
      model: 'farense',
    },
    mlx_lm: {
      start: () => startServer('mlx_lm server', py, ['-m', 'bench.anchors', 'server', '--model', o.model, '--host', '127.0.0.1',
        '--port', String(ports.mlx_lm), '--log-level', 'WARNING'],
      // the BLAS, not our small-product kernel (bench/anchors.py ANCHOR_DEFAULTS)
      { SMALL_GEMM: process.env.SMALL_GEMM ?? '0' }, `http://127.0.0.1:${ports.mlx_lm}/health`),
      url: `http://127.0.0.1:${ports.mlx_lm}/v1/chat/completions`,
      model: o.model,
    },
  };
}

const body = (stack, maxTokens) => JSON.stringify({
  model: stack.model, messages: [{ role: 'user', content: PROMPT }], max_tokens: maxTokens, temperature: 0,
});

function cannon(stack, maxTokens, connections, duration) {
  return autocannon({
    url: stack.url, method: 'POST', connections, duration, timeout: 120,
    headers: { 'content-type': 'application/json' }, body: body(stack, maxTokens),
  });
}

/** Sequential requests, one at a time, new connection each: the reference latency. */
async function sequential(stack, maxTokens, n = 5) {
  const ms = [];
  let tokens = 0;
  for (let i = 0; i < n; i++) {
    const t0 = performance.now();
    const res = await fetch(stack.url, { method: 'POST', headers: { 'content-type': 'application/json', connection: 'close' }, body: body(stack, maxTokens) });
    const json = await res.json();
    ms.push(performance.now() - t0);
    tokens = json.usage?.completion_tokens ?? tokens;
  }
  ms.sort((a, b) => a - b);
  return { p50_ms: Math.round(ms[Math.floor(n / 2)]), completion_tokens: tokens };
}

/** N closed loops of fetch for `duration` s: each request's own latency (no load-tool bias:
 * autocannon mis-times servers that close every connection, like mlx_lm server's HTTP/1.0). */
async function closedLoop(stack, maxTokens, connections, duration) {
  const latencies = [];
  let bad = 0;
  const end = performance.now() + duration * 1000;
  const loop = async () => {
    while (performance.now() < end) {
      const t0 = performance.now();
      try {
        const res = await fetch(stack.url, { method: 'POST', headers: { 'content-type': 'application/json' }, body: body(stack, maxTokens) });
        await res.arrayBuffer();
        if (res.status === 200) latencies.push(performance.now() - t0);
        else bad += 1;
      } catch {
        bad += 1;
      }
    }
  };
  const t0 = performance.now();
  await Promise.all(Array.from({ length: connections }, loop));
  const wall = (performance.now() - t0) / 1000;
  latencies.sort((a, b) => a - b);
  const at = (q) => Math.round(latencies[Math.min(latencies.length - 1, Math.floor(q * latencies.length))] ?? NaN);
  return { requests_per_s: Math.round((latencies.length / wall) * 100) / 100, p50_ms: at(0.5), p99_ms: at(0.99), ok: latencies.length, errors: bad };
}

const summary = (r) => ({
  requests_per_s: r.requests.average, p50_ms: r.latency.p50, p99_ms: r.latency.p99,
  ok: r['2xx'], non2xx: r.non2xx, errors: r.errors, timeouts: r.timeouts,
});

async function compare(o, s) {
  const rows = [];
  for (const [i, n] of o.levels.entries()) {
    const order = i % 2 === 0 ? ['express', 'mlx_lm'] : ['mlx_lm', 'express'];
    const row = { connections: n, autocannon: {} };
    for (const name of order) {
      row[name] = await closedLoop(s[name], o.maxTokens, n, o.duration);
      row.autocannon[name] = summary(await cannon(s[name], o.maxTokens, n, o.duration));
      console.error(`load: ${n} connections, ${name}: ${JSON.stringify(row[name])}; autocannon ${JSON.stringify(row.autocannon[name])}`);
    }
    rows.push(row);
  }
  return rows;
}

/** Overload the example, sample a 503's Retry-After meanwhile, then time until a 200. */
async function overload(o, stack) {
  const run = cannon(stack, o.maxTokens, o.overload, o.overloadDuration);
  await sleep(Math.min(5_000, (o.overloadDuration * 1000) / 2));
  let retryAfter = null;
  for (let i = 0; i < 20 && retryAfter === null; i++) {
    const res = await fetch(stack.url, { method: 'POST', headers: { 'content-type': 'application/json' }, body: body(stack, o.maxTokens) });
    if (res.status === 503) retryAfter = res.headers.get('retry-after');
    await res.arrayBuffer();
  }
  const result = summary(await run);
  const t0 = performance.now();
  let recoveredMs = null;
  while (recoveredMs === null && performance.now() - t0 < 30_000) {
    const res = await fetch(stack.url, { method: 'POST', headers: { 'content-type': 'application/json' }, body: body(stack, o.maxTokens) });
    await res.arrayBuffer();
    if (res.status === 200) recoveredMs = Math.round(performance.now() - t0);
  }
  return { connections: o.overload, duration_s: o.overloadDuration, ...result, retry_after: retryAfter, first_200_after_ms: recoveredMs };
}

async function main() {
  const o = options();
  const s = stacks(o, { express: await freePort(), mlx_lm: await freePort() });
  const children = [await s.express.start(), await s.mlx_lm.start()];
  try {
    for (const name of ['express', 'mlx_lm']) await sequential(s[name], o.maxTokens, 2); // warm up
    const reference = { express: await sequential(s.express, o.maxTokens), mlx_lm: await sequential(s.mlx_lm, o.maxTokens) };
    console.error(`load: sequential reference ${JSON.stringify(reference)}`);
    const levels = await compare(o, s);
    const over = await overload(o, s.express);
    console.error(`load: overload ${JSON.stringify(over)}`);
    const report = {
      model: path.relative(REPO_ROOT, o.model), max_tokens: o.maxTokens, duration_s: o.duration, max_queue: o.maxQueue,
      reference, levels, overload: over, date: new Date().toISOString(),
    };
    mkdirSync(path.dirname(o.out), { recursive: true });
    writeFileSync(o.out, `${JSON.stringify(report, null, 2)}\n`);
    console.log(markdown(report));
  } finally {
    for (const c of children) c.kill('SIGTERM');
  }
}

function markdown(r) {
  const lines = [
    '| connections | express req/s | mlx_lm req/s | express p50 / p99 ms | mlx_lm p50 / p99 ms | errors (express / mlx_lm) | autocannon req/s (express / mlx_lm) | autocannon p50 ms (express / mlx_lm) |',
    '|---|---|---|---|---|---|---|---|',
  ];
  for (const row of r.levels) {
    const [e, m, ae, am] = [row.express, row.mlx_lm, row.autocannon.express, row.autocannon.mlx_lm];
    lines.push(`| ${row.connections} | ${e.requests_per_s} | ${m.requests_per_s} | ${e.p50_ms} / ${e.p99_ms} | ${m.p50_ms} / ${m.p99_ms} | `
      + `${e.errors} / ${m.errors} | ${ae.requests_per_s} / ${am.requests_per_s} | ${ae.p50_ms} / ${am.p50_ms} |`);
  }
  const v = r.overload;
  lines.push('', `sequential (one request at a time, new connection): express p50 ${r.reference.express.p50_ms} ms, mlx_lm ${r.reference.mlx_lm.p50_ms} ms`,
    `overload: ${v.connections} connections for ${v.duration_s} s: ${v.ok} answered, ${v.non2xx} non-2xx (503), ${v.errors} errors, ${v.timeouts} timeouts; Retry-After: ${v.retry_after}; first 200 after the run: ${v.first_200_after_ms} ms`);
  return lines.join('\n');
}

main().catch((err) => { console.error(`load: ${err.stack}`); process.exit(1); });
