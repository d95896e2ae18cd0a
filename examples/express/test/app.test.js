// The Express app over real HTTP on loopback, with the real worker on models/tiny-mistral.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { once } from 'node:events';
import { createWorker } from '../../../clients/node/index.js';
import { createApp } from '../app.js';
import { PYTHON, MODEL, TEST_ENV, TEST_ARGS, FAULT, protocolRecorder, readSse, assertNoInternals, sleep, listen } from '../testlib/helpers.js';

const rec = protocolRecorder();
const logs = [];
const log = (level, msg, fields = {}) => logs.push({ level, msg, ...fields });
let worker;
let app;
let base;

before(async () => {
  worker = createWorker({ python: PYTHON, model: MODEL, env: TEST_ENV, args: TEST_ARGS, onMessage: rec.onMessage });
  rec.attachSend(worker);
  app = await listen(createApp(worker, { log, timeoutMs: 60_000 }));
  base = app.base;
});

after(async () => {
  app?.close();
  await worker?.close();
  assert.deepEqual(rec.invalid, [], 'every message matches docs/protocol.schema.json');
});

const post = (path, body, headers = { 'content-type': 'application/json' }) =>
  fetch(base + path, { method: 'POST', headers, body: typeof body === 'string' ? body : JSON.stringify(body) });

/** The id of the last generation request the client sent to the worker. */
const lastSentId = () => rec.sent.filter((m) => m.id && !m.op).at(-1).id;

test('GET /healthz: 503 before the worker is ready, 200 after', async () => {
  let res = await fetch(`${base}/healthz`);
  assert.equal(res.status, 503);
  assert.deepEqual(await res.json(), { ok: false });
  await worker.start();
  res = await fetch(`${base}/healthz`);
  assert.equal(res.status, 200);
  assert.deepEqual(await res.json(), { ok: true });
});

test('POST /api/chat with {message, history} and with {messages}', async () => {
  let res = await post('/api/chat', {
    message: 'Quem fundou o Farense?',
    history: [{ role: 'user', content: 'Olá' }, { role: 'assistant', content: 'Olá! Em que posso ajudar?' }],
    max_tokens: 12,
  });
  assert.equal(res.status, 200);
  assert.match(res.headers.get('content-type'), /application\/json/);
  const body = await res.json();
  assert.equal(typeof body.reply, 'string');
  assert.ok(body.reply.length > 0);
  assert.equal(body.usage.completion_tokens, 12);
  assert.ok(body.usage.prompt_tokens > 0);
  const sent = rec.sent.find((m) => m.id === lastSentId());
  assert.deepEqual(sent.messages.map((m) => m.role), ['user', 'assistant', 'user']);
  assert.equal(sent.messages[2].content, 'Quem fundou o Farense?');

  res = await post('/api/chat', { messages: [{ role: 'user', content: 'Qual é o estádio?' }], max_tokens: 6 });
  assert.equal(res.status, 200);
  const b2 = await res.json();
  const done = rec.messages.find((m) => m.type === 'done' && m.id === lastSentId());
  assert.equal(b2.reply, done.text);
  assert.deepEqual(b2.usage, done.usage);
});

test('POST /api/chat/stream: SSE tokens arrive before the done event', async () => {
  const res = await post('/api/chat/stream', { message: 'Conta a história do Farense.', max_tokens: 200 });
  assert.equal(res.status, 200);
  assert.match(res.headers.get('content-type'), /^text\/event-stream/);
  const events = await readSse(res.body);
  const data = events.filter((e) => e.event === 'message');
  const done = events.at(-1);
  assert.equal(done.event, 'done');
  assert.equal(data.length, events.length - 1);
  assert.ok(data.length > 1);
  for (const e of data) assert.equal(typeof e.data.text, 'string');
  assert.deepEqual(Object.keys(done.data).sort(), ['finish_reason', 'timing', 'usage']);
  assert.deepEqual(Object.keys(done.data.timing).sort(), ['tokens_per_s', 'ttft_ms']);
  assert.ok(done.data.timing.tokens_per_s > 0 && done.data.timing.ttft_ms > 0);
  assert.equal(done.data.finish_reason, 'length');
  assert.equal(done.data.usage.completion_tokens, 200);
  // streamed: the first token was read in an earlier chunk, before the generation finished
  assert.ok(data[0].at < done.at, `first token at ${data[0].at}, done at ${done.at}`);
  assert.ok(done.at - data[0].at > 20, `tokens spread over ${done.at - data[0].at} ms`);
  const workerDone = rec.messages.find((m) => m.type === 'done' && m.id === lastSentId());
  assert.equal(data.map((e) => e.data.text).join(''), workerDone.text);
});

test('validation errors: 400 with a short JSON error and no internals', async () => {
  const bad = [
    {},
    { messages: [] },
    { messages: 'hello' },
    { messages: [{ role: 'robot', content: 'x' }] },
    { messages: [{ role: 'user', content: 5 }] },
    { messages: [{ role: 'user', content: 'x', extra: 1 }] },
    { message: '' },
    { message: 'x', history: [{ role: 'user' }] },
    { message: 'x', history: 'nope' },
    { message: 'x', messages: [{ role: 'user', content: 'x' }] },
    { message: 'x', max_tokens: 0 },
    { message: 'x', max_tokens: 1.5 },
    { message: 'x', temperature: -1 },
    { message: 'x', stream: true },
    [{ role: 'user', content: 'x' }],
    { messages: Array.from({ length: 65 }, () => ({ role: 'user', content: 'x' })) },
  ];
  const n = rec.sent.length;
  for (const path of ['/api/chat', '/api/chat/stream']) {
    for (const body of bad) {
      const res = await post(path, body);
      assert.equal(res.status, 400, `${path} ${JSON.stringify(body).slice(0, 80)}`);
      const text = await res.text();
      const json = JSON.parse(text);
      assert.deepEqual(Object.keys(json), ['error']);
      assert.ok(json.error.length < 120);
      assertNoInternals(assert, text);
    }
  }
  assert.equal(rec.sent.length, n, 'nothing reached the worker');

  for (const [body, headers] of [
    ['{"message": "x",', { 'content-type': 'application/json' }],
    ['message=x', { 'content-type': 'application/x-www-form-urlencoded' }],
    ['{"message":"x"}', { 'content-type': 'text/plain' }],
  ]) {
    const res = await post('/api/chat', body, headers);
    assert.equal(res.status, 400, body);
    const text = await res.text();
    assertNoInternals(assert, text);
    assert.ok(JSON.parse(text).error);
  }

  const res = await fetch(`${base}/nope`);
  assert.equal(res.status, 404);
  assert.deepEqual(await res.json(), { error: 'not found' });
});

test('body over 64kb: 413', async () => {
  const res = await post('/api/chat', { message: 'x'.repeat(70 * 1024) });
  assert.equal(res.status, 413);
  const text = await res.text();
  assert.deepEqual(JSON.parse(text), { error: 'request body too large' });
  assertNoInternals(assert, text);
});

test('errors from the worker: short public messages, details only in the server log', async () => {
  // too_long: a prompt over the model's context (2048 tokens) within the 64kb body limit
  const long = 'Farense São Luís '.repeat(3_000);
  let res = await post('/api/chat', { message: long });
  assert.equal(res.status, 400);
  let text = await res.text();
  assert.deepEqual(JSON.parse(text), { error: 'the conversation is too long for the model' });
  assert.ok(logs.some((l) => l.code === 'too_long' && l.error), 'worker message logged');

  // internal: a failure inside the worker (test hook)
  res = await post('/api/chat', { message: `Olá ${FAULT}`, max_tokens: 8 });
  assert.equal(res.status, 500);
  text = await res.text();
  assert.deepEqual(JSON.parse(text), { error: 'internal error' });
  assertNoInternals(assert, text);
  const logged = logs.find((l) => l.code === 'internal');
  assert.ok(logged && logged.error.length > 0, 'internal details logged server-side');
  assert.ok(!text.includes(logged.error));

  res = await post('/api/chat/stream', { message: `Olá ${FAULT}`, max_tokens: 8 });
  assert.equal(res.status, 200);
  const events = await readSse(res.body);
  assert.equal(events.at(-1).event, 'error');
  assert.deepEqual(events.at(-1).data, { error: 'internal error', status: 500, code: 'internal' });
});

/** Opens a request with node:http so the test controls the socket. */
function rawPost(path, body) {
  const req = http.request(base + path, { method: 'POST', headers: { 'content-type': 'application/json' } });
  req.end(JSON.stringify(body));
  return req;
}

test('closing the connection mid-stream cancels the generation in the worker', async () => {
  const req = rawPost('/api/chat/stream', { message: 'Conta a história do Farense.', max_tokens: 2000 });
  const [res] = await once(req, 'response');
  assert.equal(res.statusCode, 200);
  const events = await readSse(res, (ev, all) => all.filter((e) => e.event === 'message').length >= 3);
  assert.equal(events.length, 3);
  const id = lastSentId();
  req.destroy(); // the browser goes away
  const done = await rec.waitFor((m) => m.type === 'done' && m.id === id, 20_000);
  assert.equal(done.finish_reason, 'cancelled');
  assert.ok(done.usage.completion_tokens < 2000);
  assert.ok(rec.sent.some((m) => m.op === 'cancel' && m.id === id));
  const stats = await worker.stats();
  assert.equal(stats.in_flight, 0);
  await sleep(50);
  assert.ok(logs.some((l) => /client disconnected/.test(l.msg) && l.id === id));
});

test('closing the connection of POST /api/chat cancels the generation too', async () => {
  const req = rawPost('/api/chat', { message: 'Conta a história do Farense.', max_tokens: 2000 });
  req.on('error', () => {});
  // wait until the request reached the worker and is generating, then hang up
  const sentAt = rec.sent.length;
  for (let i = 0; i < 500 && rec.sent.length === sentAt; i++) await sleep(10);
  const id = lastSentId();
  assert.equal(rec.sent.at(-1).id, id);
  await sleep(300);
  req.destroy();
  const done = await rec.waitFor((m) => m.type === 'done' && m.id === id, 20_000);
  assert.equal(done.finish_reason, 'cancelled');
  // and the worker is still healthy
  const res = await post('/api/chat', { message: 'Olá', max_tokens: 4 });
  assert.equal(res.status, 200);
});

test('a worker crash: the request gets 503 with a short message; the next one succeeds', async () => {
  const p = post('/api/chat', { message: 'Olá', max_tokens: 2000 });
  await sleep(300);
  process.kill(worker.pid, 'SIGKILL');
  const res = await p;
  assert.equal(res.status, 503);
  const text = await res.text();
  assert.deepEqual(JSON.parse(text), { error: 'the model is restarting, try again shortly' });
  assertNoInternals(assert, text);
  const res2 = await post('/api/chat', { message: 'Olá', max_tokens: 4 });
  assert.equal(res2.status, 200);
});
