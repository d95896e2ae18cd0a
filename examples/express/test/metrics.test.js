// GET /metrics (prom-client), scraped after real traffic through the app and the worker.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { startWorker } from '../../../clients/node/index.js';
import { createApp } from '../app.js';
import { PYTHON, MODEL, REPO, TEST_ENV, TEST_ARGS, sleep, listen } from '../testlib/helpers.js';

let worker;
let http;
let base;
let app;
const dones = [];

before(async () => {
  worker = await startWorker({ python: PYTHON, model: MODEL, env: TEST_ENV, args: TEST_ARGS, restart: { baseDelayMs: 50 } });
  worker.on('message', (m) => { if (m.type === 'done') dones.push(m); });
  app = createApp(worker, { log: () => {}, reload: () => worker.reload({ model: path.join(REPO, 'models', 'tiny-mistral-4bit') }) });
  http = await listen(app);
  base = http.base;
});

after(async () => {
  http?.close();
  await worker?.close();
});

/** The Prometheus text as { 'name{labels}': value }. */
async function scrape() {
  const res = await fetch(`${base}/metrics`);
  assert.equal(res.status, 200);
  assert.match(res.headers.get('content-type'), /^text\/plain; version=0\.0\.4/);
  const out = {};
  for (const line of (await res.text()).split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const i = line.lastIndexOf(' ');
    out[line.slice(0, i)] = Number(line.slice(i + 1));
  }
  return out;
}

const post = (p, body) => fetch(base + p, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });

test('requests, errors, tokens, time to first token, memory, restarts and reloads are scraped', async () => {
  for (const n of [3, 5]) assert.equal((await post('/api/chat', { message: 'Olá', max_tokens: n })).status, 200);
  assert.equal((await post('/api/chat', { message: '' })).status, 400);
  const s = await (await post('/api/chat/stream', { message: 'Olá', max_tokens: 4 })).text();
  assert.match(s, /event: done/);
  await fetch(`${base}/nope`);
  let m = await scrape();
  assert.equal(m['http_requests_total{route="/api/chat",code="200"}'], 2);
  assert.equal(m['http_requests_total{route="/api/chat",code="400"}'], 1);
  assert.equal(m['http_requests_total{route="/api/chat/stream",code="200"}'], 1);
  assert.equal(m['http_request_errors_total{route="/api/chat",code="400"}'], 1);
  assert.equal(m['http_request_errors_total{route="unmatched",code="404"}'], 1);
  assert.equal(m['http_requests_total{route="/api/chat",code="500"}'], undefined);
  assert.equal(m['http_request_duration_seconds_count{route="/api/chat"}'], 3);
  assert.equal(m.generation_tokens_total, 3 + 5 + 4);
  assert.equal(m.generation_tokens_total, dones.reduce((n, d) => n + d.usage.completion_tokens, 0));
  assert.equal(m.generation_time_to_first_token_seconds_count, 3);
  assert.equal(m.generation_requests_in_flight, 0);
  assert.equal(m.worker_queued_requests, 0);
  assert.ok(m.worker_resident_memory_bytes > 10 * 2 ** 20, String(m.worker_resident_memory_bytes));
  const st = await worker.stats();
  assert.equal(st.memory.resident_source, 'rss'); // the tests run on the CPU backend
  assert.ok(m.worker_rss_bytes > 10 * 2 ** 20, String(m.worker_rss_bytes));
  assert.ok(m.worker_mlx_active_memory_bytes > 0, String(m.worker_mlx_active_memory_bytes));
  assert.ok(m.worker_mlx_cache_memory_bytes >= 0);
  // the three exchanges above were stored in the prefix cache, within its budget
  assert.equal(m.worker_prefix_cache_budget_bytes, st.prefix_cache.budget_bytes);
  assert.ok(m.worker_prefix_cache_budget_bytes > 0);
  assert.ok(m.worker_prefix_cache_entries >= 1, String(m.worker_prefix_cache_entries));
  assert.ok(m.worker_prefix_cache_bytes > 0 && m.worker_prefix_cache_bytes <= m.worker_prefix_cache_budget_bytes,
    `${m.worker_prefix_cache_bytes} of ${m.worker_prefix_cache_budget_bytes}`);
  assert.equal(m.worker_restarts_total, 0);

  process.kill(worker.pid, 'SIGKILL');
  for (let i = 0; i < 500 && !(worker.restarts === 1 && worker.ready); i++) await sleep(20);
  await app.locals.reload('test');
  m = await scrape();
  assert.equal(m.worker_restarts_total, 1);
  assert.equal(m['worker_reloads_total{result="ok"}'], 1);
});
