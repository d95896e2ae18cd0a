// The client against the real worker (python -m worker) on models/tiny-mistral.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startWorker, WorkerError, TimeoutError, AbortError, PROTOCOL_VERSION } from '../index.js';
import { PYTHON, MODEL, TEST_ENV, TEST_ARGS, FAULT, protocolRecorder } from '../testlib/helpers.js';

const LONG = { prompt: 'Conta a história do Sporting Clube Farense.', max_tokens: 2000 };
const rec = protocolRecorder();
let worker;

before(async () => {
  worker = await startWorker({ python: PYTHON, model: MODEL, env: TEST_ENV, args: TEST_ARGS, onMessage: rec.onMessage });
  rec.attachSend(worker);
});

after(async () => {
  await worker?.close();
  assert.deepEqual(rec.invalid, [], 'every message matches docs/protocol.schema.json');
});

test('ready message describes the worker', () => {
  assert.equal(worker.ready, true);
  assert.equal(worker.info.type, 'ready');
  assert.equal(worker.info.protocol, PROTOCOL_VERSION);
  assert.equal(worker.info.pid, worker.pid);
  assert.equal(rec.messages[0].type, 'ready');
});

test('complete() resolves with the done message', async () => {
  const done = await worker.complete({ messages: [{ role: 'user', content: 'Olá! Quem fundou o Farense?' }], max_tokens: 16 });
  assert.equal(done.type, 'done');
  assert.ok(['stop', 'length'].includes(done.finish_reason));
  assert.equal(typeof done.text, 'string');
  assert.ok(done.usage.prompt_tokens > 0);
  assert.ok(done.usage.completion_tokens > 0 && done.usage.completion_tokens <= 16);
  const sent = rec.sent.find((m) => m.id === done.id);
  assert.equal(sent.stream, false);
  assert.equal(worker.inFlight, 0);
});

test('stream() yields token texts that concatenate to the done text', async () => {
  const s = worker.stream({ prompt: 'Qual é o estádio do Farense? São Luís?', max_tokens: 24 });
  const texts = [];
  for await (const t of s) {
    assert.equal(typeof t, 'string');
    assert.ok(t.length > 0);
    texts.push(t);
  }
  const done = await s.done;
  assert.equal(done.id, s.id);
  assert.ok(texts.length > 0, 'at least one token');
  assert.equal(texts.join(''), done.text);
  const tokenMsgs = rec.messages.filter((m) => m.type === 'token' && m.id === s.id);
  assert.equal(tokenMsgs.length, texts.length);
});

test('abort mid-stream: the worker reports cancelled and stays healthy', async () => {
  const ac = new AbortController();
  const s = worker.stream(LONG, { signal: ac.signal });
  const texts = [];
  for await (const t of s) {
    texts.push(t);
    if (texts.length === 3) ac.abort();
  }
  assert.equal(texts.length, 3, 'iteration ends at once after abort');
  const done = await s.done;
  assert.equal(done.finish_reason, 'cancelled');
  assert.ok(done.text.startsWith(texts.join('')));
  assert.ok(rec.sent.some((m) => m.op === 'cancel' && m.id === s.id));
  const next = await worker.complete({ prompt: 'Olá', max_tokens: 8 });
  assert.ok(['stop', 'length'].includes(next.finish_reason));
});

test('breaking out of a stream loop cancels the generation', async () => {
  const s = worker.stream(LONG);
  for await (const t of s) { assert.ok(t); break; }
  const done = await s.done;
  assert.equal(done.finish_reason, 'cancelled');
});

test('abort of complete(): rejects with AbortError, the worker ends it as cancelled', async () => {
  const ac = new AbortController();
  const p = worker.complete(LONG, { signal: ac.signal });
  // complete() does not stream: wait until the request is surely generating
  const sent = rec.sent.at(-1);
  await new Promise((r) => setTimeout(r, 300));
  ac.abort();
  const err = await p.then(() => null, (e) => e);
  assert.ok(err instanceof AbortError);
  assert.equal(err.name, 'AbortError');
  assert.equal(err.id, sent.id);
  const done = await rec.waitFor((m) => m.type === 'done' && m.id === sent.id);
  assert.equal(done.finish_reason, 'cancelled');
  assert.equal((await worker.complete({ prompt: 'Olá', max_tokens: 4 })).type, 'done');
});

test('an already aborted signal rejects without sending anything', async () => {
  const n = rec.sent.length;
  await assert.rejects(worker.complete({ prompt: 'x' }, { signal: AbortSignal.abort() }), { name: 'AbortError' });
  assert.equal(rec.sent.length, n);
});

test('timeout: TimeoutError, the request is cancelled in the worker, worker still healthy', async () => {
  const err = await worker.complete(LONG, { timeoutMs: 400 }).then(() => null, (e) => e);
  assert.ok(err instanceof TimeoutError, String(err));
  assert.ok(err instanceof WorkerError);
  assert.equal(err.code, 'timeout');
  assert.ok(rec.sent.some((m) => m.op === 'cancel' && m.id === err.id));
  const done = await rec.waitFor((m) => m.type === 'done' && m.id === err.id);
  assert.equal(done.finish_reason, 'cancelled');
  const next = await worker.complete({ prompt: 'Olá', max_tokens: 8 }, { timeoutMs: 60_000 });
  assert.equal(next.type, 'done');
});

test('timeout of a stream: the iterator throws TimeoutError', async () => {
  const s = worker.stream(LONG, { timeoutMs: 400 });
  await assert.rejects(async () => { for await (const t of s) assert.ok(t); }, TimeoutError);
  await assert.rejects(s.done, TimeoutError);
  await rec.waitFor((m) => m.type === 'done' && m.id === s.id);
  assert.equal(worker.inFlight, 0);
});

test('20 concurrent requests all resolve, with distinct ids', async () => {
  const prompts = Array.from({ length: 20 }, (_, i) => ({ prompt: `Pergunta número ${i}: quem é o Farense?`, max_tokens: 8 }));
  const dones = await Promise.all(prompts.map((p) => worker.complete(p, { timeoutMs: 120_000 })));
  const ids = dones.map((d) => d.id);
  assert.equal(new Set(ids).size, 20);
  for (const d of dones) {
    assert.equal(d.type, 'done');
    assert.ok(['stop', 'length'].includes(d.finish_reason));
    // exactly one terminal message per id
    assert.equal(rec.messages.filter((m) => (m.type === 'done' || m.type === 'error') && m.id === d.id).length, 1);
  }
  assert.equal(worker.inFlight, 0);
});

test('a worker error rejects with WorkerError carrying its code', async () => {
  rec.expectInvalid = true; // these requests are invalid on purpose
  const expectedBefore = rec.expectedInvalid.length;
  const err = await worker.complete({ prompt: 'x', temperature: -1 }).then(() => null, (e) => e);
  assert.ok(err instanceof WorkerError, String(err));
  assert.equal(err.code, 'invalid_request');
  assert.match(err.message, /temperature/);
  await assert.rejects(worker.complete({ messages: [] }), { name: 'WorkerError', code: 'invalid_request' });
  await assert.rejects(worker.complete({ prompt: 'x', nonsense: 1 }), { code: 'invalid_request' });
  const s = worker.stream({ messages: [{ role: 'robot', content: 'x' }] });
  await assert.rejects(async () => { for await (const t of s) assert.ok(t); }, { code: 'invalid_request' });
  rec.expectInvalid = false;
  assert.equal(rec.expectedInvalid.length - expectedBefore, 4, 'the schema rejects the same 4 requests');
});

test('an internal failure in the worker rejects with WorkerError internal; the worker keeps serving', async () => {
  const err = await worker.complete({ prompt: `Olá ${FAULT}`, max_tokens: 8 }).then(() => null, (e) => e);
  assert.ok(err instanceof WorkerError, String(err));
  assert.equal(err.code, 'internal');
  assert.equal((await worker.complete({ prompt: 'Olá', max_tokens: 4 })).type, 'done');
});

test('a large request respects stdin backpressure; over max_line_bytes is refused locally', async () => {
  // ~600 KB line: far above the pipe buffer, so write() returns false and the client waits for 'drain'
  const big = 'Farense '.repeat(75_000);
  const waits = worker.backpressureWaits;
  const err = await worker.complete({ prompt: big, max_tokens: 4 }, { timeoutMs: 120_000 }).then(() => null, (e) => e);
  assert.ok(err instanceof WorkerError, String(err));
  assert.equal(err.code, 'too_long');
  assert.ok(worker.backpressureWaits > waits, 'stdin write waited for drain');
  const n = rec.sent.length;
  const huge = 'x'.repeat(worker.info.max_line_bytes);
  await assert.rejects(worker.complete({ prompt: huge }), { code: 'too_large' });
  assert.equal(rec.sent.length, n, 'not sent');
  assert.equal((await worker.complete({ prompt: 'Olá', max_tokens: 4 })).type, 'done');
});

test('ping() and stats()', async () => {
  const ms = await worker.ping();
  assert.ok(ms >= 0 && ms < 10_000);
  const stats = await worker.stats();
  assert.equal(stats.type, 'stats');
  assert.equal(stats.in_flight, 0);
  assert.ok(stats.served >= 20);
  const [a, b] = await Promise.all([worker.stats(), worker.ping()]);
  assert.equal(a.type, 'stats');
  assert.ok(b >= 0);
});

test('stream(): opts.onToken gets each whole token message, in order, matching the iteration', async () => {
  const messages = [];
  const s = worker.stream({ prompt: 'Olá', max_tokens: 12 }, { onToken: (m) => messages.push(m) });
  const texts = [];
  for await (const text of s) texts.push(text);
  const done = await s.done;
  assert.ok(messages.length > 1);
  assert.deepEqual(messages.map((m) => Object.keys(m).sort()), messages.map(() => ['id', 'text', 'type']));
  assert.ok(messages.every((m) => m.type === 'token' && m.id === s.id));
  assert.deepEqual(messages.map((m) => m.text), texts);
  assert.equal(texts.join(''), done.text);
});
