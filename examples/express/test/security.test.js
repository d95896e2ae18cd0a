// Security of the Express example over real HTTP on loopback (GitHub issue #7): what
// app.test.js does not cover. Most tests use a stub worker (no Python), so they show exactly
// what reaches the worker; the lone-surrogate test uses the real one.
//   - compressed bodies are limited after inflating (a gzip bomb is 413, not 10 MB parsed)
//   - odd encodings, charsets, deep JSON, prototype keys: 4xx, short JSON, no internals
//   - no X-Powered-By, JSON errors that never reflect the URL or the body
//   - worker errors carrying paths and stack traces: 5xx with a fixed public message
//   - a lone surrogate (valid for JSON.parse, refused by the worker with no id): 400 at once
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import http from 'node:http';
import zlib from 'node:zlib';
import { WorkerError, WorkerExitedError, createWorker } from '../../../clients/node/index.js';
import { createApp } from '../app.js';
import { PYTHON, MODEL, assertNoInternals } from '../testlib/helpers.js';

const INTERNALS = 'Traceback (most recent call last):\n  File "/work/main/worker/engine.py", line 42\nKeyError: /home/app/models/secret';

/** A worker stand-in: records what reaches it; `fail` makes it throw. */
function stubWorker() {
  const stub = {
    ready: true,
    calls: [],
    fail: null,
    complete(request) {
      stub.calls.push(request);
      if (stub.fail) return Promise.reject(stub.fail());
      return Promise.resolve({ text: 'ok', usage: { prompt_tokens: 1, completion_tokens: 1, cached_tokens: 0 }, finish_reason: 'stop' });
    },
    stream(request) {
      stub.calls.push(request);
      const err = stub.fail ? stub.fail() : null;
      const done = err ? Promise.reject(err) : Promise.resolve({ usage: {}, finish_reason: 'stop' });
      done.catch(() => {});
      return {
        id: 'stub-1',
        done,
        async* [Symbol.asyncIterator]() {
          if (err) throw err;
          yield 'ok';
        },
      };
    },
  };
  return stub;
}

const logs = [];
const log = (level, msg, fields = {}) => logs.push({ level, msg, ...fields });
let worker;
let server;
let base;

before(async () => {
  worker = stubWorker();
  server = createApp(worker, { log, timeoutMs: 5_000 }).listen(0, '127.0.0.1');
  await once(server, 'listening');
  base = `http://127.0.0.1:${server.address().port}`;
});

after(() => {
  server?.closeAllConnections();
  server?.close();
});

/** A raw POST (node:http), so the test controls every header and byte. */
function rawPost(path, body, headers = {}) {
  return new Promise((resolve, reject) => {
    const req = http.request(base + path, { method: 'POST', headers: { 'content-type': 'application/json', ...headers } }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, text: Buffer.concat(chunks).toString('utf8') }));
    });
    req.on('error', reject);
    req.end(body);
  });
}

function assertShortJsonError(res, status) {
  assert.equal(res.status, status, res.text);
  assert.match(res.headers['content-type'], /^application\/json/);
  const json = JSON.parse(res.text);
  assert.deepEqual(Object.keys(json), ['error']);
  assert.ok(json.error.length < 120, json.error);
  assertNoInternals(assert, res.text);
  assert.equal(res.headers['x-powered-by'], undefined);
  return json;
}

test('a gzip or deflate bomb is refused after inflating: 413, nothing parsed', async () => {
  const calls = worker.calls.length;
  const big = Buffer.from(JSON.stringify({ message: 'x', history: [], pad: ' '.repeat(10 << 20) }));
  for (const [encoding, compress] of [['gzip', zlib.gzipSync], ['deflate', zlib.deflateSync], ['br', zlib.brotliCompressSync]]) {
    const body = compress(big);
    assert.ok(body.length < 64 * 1024, `${encoding}: ${body.length} bytes on the wire`);
    for (const path of ['/api/chat', '/api/chat/stream']) {
      const res = await rawPost(path, body, { 'content-encoding': encoding });
      assert.deepEqual(assertShortJsonError(res, 413), { error: 'request body too large' }, `${encoding} ${path}`);
    }
  }
  // A small compressed body is fine (so the refusal above is about size, not gzip).
  const ok = await rawPost('/api/chat', zlib.gzipSync(Buffer.from('{"message":"Olá"}')), { 'content-encoding': 'gzip' });
  assert.equal(ok.status, 200, ok.text);
  assert.equal(worker.calls.length, calls + 1);
});

test('odd encodings, charsets and media types: 4xx with a short JSON error', async () => {
  const calls = worker.calls.length;
  const cases = [
    [415, '{"message":"x"}', { 'content-encoding': 'x-evil' }],
    [415, '{"message":"x"}', { 'content-type': 'application/json; charset=x-nope' }],
    [415, '{"message":"x"}', { 'content-encoding': 'gzip, gzip' }],
    [400, Buffer.from([0x7b, 0x22, 0x6d, 0xff, 0xfe, 0x22, 0x3a, 0x31, 0x7d]), {}],  // invalid UTF-8
    [400, '{"message":"x"}', { 'content-encoding': 'gzip' }],                         // not gzip at all
    [400, '\u0000{"message":"x"}', {}],
    [400, '{"message":"x"}'.repeat(2), {}],
  ];
  for (const [status, body, headers] of cases) {
    const res = await rawPost('/api/chat', body, headers);
    assertShortJsonError(res, status);
    assert.ok(!res.text.includes('message'), `the body is not echoed: ${res.text}`);
  }
  assert.equal(worker.calls.length, calls, 'nothing reached the worker');
});

test('deep JSON and prototype keys: 400, no pollution, the server keeps serving', async () => {
  const calls = worker.calls.length;
  const deep = '['.repeat(30_000) + ']'.repeat(30_000);
  const deepObj = `{"message":${'{"a":'.repeat(5_000)}1${'}'.repeat(5_000)}}`;
  for (const body of [deep, deepObj, '[' .repeat(60_000),
    '{"__proto__":{"polluted":true},"message":"x"}',
    '{"message":"x","constructor":{"prototype":{"polluted":true}}}',
    '{"messages":[{"role":"user","content":"x","__proto__":{"polluted":true}}]}',
    '{"message":"x","history":[{"role":"__proto__","content":"x"}]}',
  ]) {
    const res = await rawPost('/api/chat', body);
    assertShortJsonError(res, 400);
  }
  assert.equal({}.polluted, undefined);
  assert.equal(Object.prototype.polluted, undefined);
  assert.equal(worker.calls.length, calls, 'nothing reached the worker');
  const health = await fetch(`${base}/healthz`);
  assert.equal(health.status, 200);
});

test('no reflection: 404 and method errors are fixed JSON, never the URL', async () => {
  for (const [method, path] of [['GET', '/api/chat'], ['GET', '/<script>alert(1)</script>'],
    ['PUT', '/api/chat'], ['DELETE', '/healthz'], ['GET', '/..%2f..%2fetc%2fpasswd'], ['GET', '/%ZZ']]) {
    const res = await fetch(base + path, { method });
    const text = await res.text();
    assert.ok([400, 404].includes(res.status), `${method} ${path}: ${res.status}`);
    assert.match(res.headers.get('content-type'), /^application\/json/);
    assert.equal(res.headers.get('x-powered-by'), null);
    assert.ok(!text.includes('script') && !text.includes('passwd') && !text.includes('ZZ'), text);
    assertNoInternals(assert, text);
  }
});

test('worker errors with paths and stack traces: a fixed public message, details only in the log', async () => {
  const failures = [
    [500, () => new WorkerError('internal', INTERNALS, { id: 'x' })],
    [500, () => new WorkerError('bad_json', INTERNALS, { id: null })],
    [500, () => Object.assign(new Error(INTERNALS), { stack: INTERNALS })],
    [503, () => new WorkerExitedError(`worker exited: ${INTERNALS}`)],
  ];
  try {
    for (const [status, fail] of failures) {
      worker.fail = fail;
      const res = await rawPost('/api/chat', '{"message":"Olá"}');
      assertShortJsonError(res, status);
      assert.ok(!res.text.includes('secret') && !res.text.includes('engine.py'));
      const sse = await rawPost('/api/chat/stream', '{"message":"Olá"}');
      assert.equal(sse.status, 200);
      assertNoInternals(assert, sse.text);
      assert.match(sse.text, /^event: error\ndata: \{"error":"[^"]+","status":\d+,"code":"[a-z_]+"\}\n\n$/);
    }
    worker.fail = () => { throw new TypeError(INTERNALS); };   // a synchronous throw
    const res = await rawPost('/api/chat', '{"message":"Olá"}');
    assertShortJsonError(res, 500);
  } finally {
    worker.fail = null;
  }
  assert.ok(logs.some((l) => typeof l.error === 'string' && l.error.includes('engine.py')), 'details are logged');
});

/** One real worker (tiny model) for the tests that need the whole chain. */
let real = null;
const workerErrors = [];
async function realWorker() {
  if (!real) {
    real = createWorker({ python: PYTHON, model: MODEL });
    real.on('error', (err) => workerErrors.push(err));
    await real.start();
  }
  return real;
}
after(async () => { await real?.close(); });

test('a lone surrogate reaches no worker: 400 at once, not a timeout', async () => {
  // JSON.parse accepts "\ud800"; the worker refuses such a line as bad_json with id null
  // (docs/PROTOCOL.md rule 2), so the client would wait for a terminal message that never
  // comes: the browser got a 504 after timeoutMs, and the request stayed in the client.
  const w = await realWorker();
  const srv = createApp(w, { log: () => {}, timeoutMs: 8_000 }).listen(0, '127.0.0.1');
  await once(srv, 'listening');
  const url = `http://127.0.0.1:${srv.address().port}`;
  workerErrors.length = 0;
  try {
    for (const body of ['{"message":"\\ud800"}', '{"message":"ok \\udfff ok"}',
      '{"messages":[{"role":"user","content":"\\udc00\\ud800"}]}',
      '{"message":"x","history":[{"role":"user","content":"\\ud83d"},{"role":"assistant","content":"y"}]}']) {
      const t0 = performance.now();
      const res = await fetch(`${url}/api/chat`, { method: 'POST', headers: { 'content-type': 'application/json' }, body });
      const text = await res.text();
      const ms = performance.now() - t0;
      assert.equal(res.status, 400, `${body}: ${res.status} after ${Math.round(ms)} ms: ${text}`);
      assertNoInternals(assert, text);
    }
    assert.equal(w.inFlight, 0, 'nothing is left waiting in the client');
    assert.deepEqual(workerErrors.map((e) => e.code), [], 'the worker saw no bad line');
    // and a well-formed astral character is fine
    const ok = await fetch(`${url}/api/chat`, { method: 'POST', headers: { 'content-type': 'application/json' },
      body: '{"message":"\\ud83d\\ude00 Olá","max_tokens":3}' });
    assert.equal(ok.status, 200, await ok.text());
  } finally {
    srv.closeAllConnections();
    srv.close();
  }
});

test('the client itself refuses a lone surrogate at once and keeps nothing in flight', async () => {
  // clients/node: the same request sent directly (not through the app). Today it waits for
  // its timeout and the request stays in the client's table forever (inFlight never drops).
  const w = await realWorker();
  workerErrors.length = 0;
  const t0 = performance.now();
  const err = await w.complete({ messages: [{ role: 'user', content: 'x\ud800' }] }, { timeoutMs: 3_000 })
    .then(() => null, (e) => e);
  const ms = performance.now() - t0;
  assert.ok(err instanceof WorkerError, `rejected with ${err}`);
  assert.equal(err.code, 'invalid_request', `${err.code} after ${Math.round(ms)} ms: ${err.message}`);
  assert.ok(ms < 1_000, `refused after ${Math.round(ms)} ms`);
  assert.equal(w.inFlight, 0, 'nothing left waiting in the client');
  assert.deepEqual(workerErrors.map((e) => e.code), [], 'nothing unparseable reached the worker');
});

test('the chat page: security headers, a CSP with no inline script, revalidated caching, no inline code in the HTML', async () => {
  const res = await fetch(`${base}/`);
  assert.equal(res.status, 200);
  assert.match(res.headers.get('content-type'), /^text\/html/);
  const csp = res.headers.get('content-security-policy');
  assert.match(csp, /default-src 'none'/);
  assert.match(csp, /script-src 'self'(;|$)/);
  assert.match(csp, /frame-ancestors 'none'/);
  assert.doesNotMatch(csp, /unsafe-inline|unsafe-eval|\*/);
  assert.equal(res.headers.get('x-content-type-options'), 'nosniff');
  assert.equal(res.headers.get('x-frame-options'), 'DENY');
  assert.equal(res.headers.get('referrer-policy'), 'no-referrer');
  assert.equal(res.headers.get('cache-control'), 'no-cache');
  const etag = res.headers.get('etag');
  assert.ok(etag);
  const html = await res.text();
  // (node:http: fetch adds Cache-Control: no-cache to a conditional request, as the Fetch spec says)
  const [again] = await once(http.get(`${base}/`, { headers: { 'if-none-match': etag } }), 'response');
  again.resume();
  assert.equal(again.statusCode, 304, 'revalidated, not re-sent');
  // no inline script or style that the CSP would have to allow
  for (const tag of html.match(/<script\b[^>]*>/g)) assert.match(tag, /\ssrc="[^"]+"/, tag);
  assert.doesNotMatch(html, /<style\b|\sstyle=|\son[a-z]+=/i);
  assertNoInternals(assert, html);

  for (const [file, type] of [['chat.js', /^text\/javascript/], ['conversation.js', /^text\/javascript/], ['i18n.js', /^text\/javascript/],
    ['chat.css', /^text\/css/], ['icon.svg', /^image\/svg\+xml/]]) {
    const r = await fetch(`${base}/${file}`);
    assert.equal(r.status, 200, file);
    assert.match(r.headers.get('content-type'), type, file);
    assert.equal(r.headers.get('x-content-type-options'), 'nosniff');
    assert.ok(r.headers.get('content-security-policy'));
  }
  // the API's responses carry the headers too
  const api = await fetch(`${base}/healthz`);
  assert.equal(api.headers.get('x-content-type-options'), 'nosniff');
  for (const path of ['/.env', '/../app.js', '/public/chat.js', '/node_modules/express/package.json']) {
    const r = await fetch(base + path);
    assert.ok([400, 404].includes(r.status), `${path}: ${r.status}`);
  }
});

test('GET /api/info: the model\'s public name and the limits the page trims to, nothing internal', async () => {
  const srv = createApp(worker, { log: () => {}, modelId: 'farense-v2' }).listen(0, '127.0.0.1');
  await once(srv, 'listening');
  try {
    const res = await fetch(`http://127.0.0.1:${srv.address().port}/api/info`);
    assert.equal(res.status, 200);
    const text = await res.text();
    assert.deepEqual(JSON.parse(text), { model: 'farense-v2', limits: { max_messages: 64, max_body_bytes: 65536 } });
    assertNoInternals(assert, text);
  } finally {
    srv.close();
  }
  // and 64 kB is the limit the body parser applies: one byte more is refused
  const body = (n) => JSON.stringify({ message: 'x'.repeat(n) });
  const fill = 65536 - body(0).length;
  assert.equal((await rawPost('/api/chat', body(fill))).status, 200);
  assert.equal((await rawPost('/api/chat', body(fill + 1))).status, 413);
});
