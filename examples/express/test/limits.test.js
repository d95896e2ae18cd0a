// Per-client limits (limits.js) over real HTTP on loopback, with the real worker on the tiny
// model: two clients on two source addresses (127.0.0.2 and 127.0.0.3: Linux routes all of
// 127/8 to lo; macOS needs an alias, else these tests are skipped with the reason); the greedy
// one is throttled (generations open at once, then requests per minute) while the other's
// requests complete. Then TRUST_PROXY: behind a proxy, clients are told apart by
// X-Forwarded-For only when the proxy is trusted.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import net from 'node:net';
import { once } from 'node:events';
import { createWorker } from '../../../clients/node/index.js';
import { createApp } from '../app.js';
import { PYTHON, MODEL, TEST_ENV, TEST_ARGS, protocolRecorder, readSse, assertNoInternals, listen } from '../testlib/helpers.js';

const GREEDY = '127.0.0.2';
const POLITE = '127.0.0.3';

/** Why 127.0.0.2/3 cannot be used as source addresses here, or false. */
async function aliasesMissing() {
  for (const address of [GREEDY, POLITE]) {
    const probe = net.createServer();
    try {
      probe.listen(0, address);
      await once(probe, 'listening');
    } catch (err) {
      return `${address} is not a local address here (${err.code}); on macOS: sudo ifconfig lo0 alias ${address} up`;
    } finally {
      probe.close();
    }
  }
  return false;
}
const skip = await aliasesMissing();

const rec = protocolRecorder();
let worker;

before(async () => {
  if (skip) return;
  worker = createWorker({ python: PYTHON, model: MODEL, env: TEST_ENV, args: TEST_ARGS, onMessage: rec.onMessage });
  rec.attachSend(worker);
  await worker.start();
});
after(async () => { await worker?.close(); });

/** A POST from `from` (the socket's source address): the request and its response. */
async function post(base, from, path, body, headers = {}) {
  const req = http.request(`${base}${path}`, {
    method: 'POST', localAddress: from, agent: false,
    headers: { 'content-type': 'application/json', ...headers },
  });
  req.end(JSON.stringify(body));
  const [res] = await once(req, 'response');
  return { req, res };
}

/** The whole response as { status, headers, json }. */
async function call(base, from, path, body, headers) {
  const { res } = await post(base, from, path, body, headers);
  let text = '';
  for await (const chunk of res) text += chunk;
  assertNoInternals(assert, text);
  return { status: res.statusCode, headers: res.headers, json: JSON.parse(text) };
}

const chat = (base, from, headers) => call(base, from, '/api/chat', { message: 'Olá', max_tokens: 3 }, headers);

test('a greedy client is throttled while another one is served', { skip }, async () => {
  const app = createApp(worker, { log: () => {}, timeoutMs: 60_000, limits: { perMinute: 6, concurrent: 2 } });
  const srv = await listen(app);
  const open = app.locals.limits.open;
  try {
    // 1. Two long generations open at once are the greedy client's share; a third is refused.
    const streams = [];
    for (let i = 0; i < 2; i++) {
      const { req, res } = await post(srv.base, GREEDY, '/api/chat/stream', { message: 'Conta tudo.', max_tokens: 2000 });
      assert.equal(res.statusCode, 200);
      const [chunk] = await once(res, 'data'); // its first token arrived: generating
      assert.match(String(chunk), /^data: \{"text"/);
      res.resume(); // and the rest is read (and dropped) while the connection stays open
      streams.push({ req, id: rec.sent.filter((m) => m.id && !m.op).at(-1).id });
    }
    assert.equal(open.get(GREEDY), 2);
    const third = await call(srv.base, GREEDY, '/api/chat/stream', { message: 'Mais?', max_tokens: 8 });
    assert.equal(third.status, 429);
    assert.equal(third.headers['retry-after'], '1');
    assert.equal(third.json.code, 'too_many_streams');

    // 2. Meanwhile the other client's request streams to its end.
    const { res } = await post(srv.base, POLITE, '/api/chat/stream', { message: 'Olá', max_tokens: 8 });
    assert.equal(res.statusCode, 200);
    const events = await readSse(res);
    assert.equal(events.at(-1).event, 'done');
    assert.equal(events.at(-1).data.usage.completion_tokens, 8);
    assert.equal(open.get(GREEDY), 2, 'the greedy streams were still open');

    // 3. The greedy client hangs up: its generations are cancelled and its share is free again.
    for (const s of streams) s.req.destroy();
    for (const s of streams) assert.equal((await rec.waitFor((m) => m.type === 'done' && m.id === s.id)).finish_reason, 'cancelled');
    assert.equal(open.has(GREEDY), false);

    // 4. Requests per minute: the greedy client has used 3 of 6 (refused ones count too).
    for (let i = 0; i < 3; i++) assert.equal((await chat(srv.base, GREEDY)).status, 200);
    const limited = await chat(srv.base, GREEDY);
    assert.equal(limited.status, 429);
    const retry = Number(limited.headers['retry-after']);
    assert.ok(retry >= 1 && retry <= 60, `Retry-After: ${limited.headers['retry-after']}`);
    assert.equal(limited.json.code, 'rate_limited');
    assert.match(limited.headers.ratelimit, /r=0/);
    const openai = await call(srv.base, GREEDY, '/v1/chat/completions', { model: 'farense', messages: [{ role: 'user', content: 'Olá' }], max_tokens: 2 });
    assert.equal(openai.status, 429);
    assert.equal(openai.json.error.code, 'rate_limit_exceeded');
    assert.ok(openai.headers['retry-after']);

    // 5. ... while the other client (1 of 6 used) is still answered.
    for (let i = 0; i < 5; i++) {
      const ok = await chat(srv.base, POLITE);
      assert.equal(ok.status, 200);
      assert.equal(ok.json.usage.completion_tokens, 3);
    }
    assert.equal((await chat(srv.base, POLITE)).status, 429, 'and it has the same limit');
  } finally {
    srv.close();
  }
});

test('behind a proxy: TRUST_PROXY tells clients apart by X-Forwarded-For, and without it the header changes nothing', { skip }, async () => {
  // The proxy is 127.0.0.2; the fans' addresses (documentation range) exist only in the header.
  const behind = await listen(createApp(worker, { log: () => {}, trustProxy: 'loopback', limits: { perMinute: 2, concurrent: 0 } }));
  const direct = await listen(createApp(worker, { log: () => {}, limits: { perMinute: 2, concurrent: 0 } }));
  try {
    const fan = (n) => ({ 'x-forwarded-for': `198.51.100.${n}` });
    assert.equal((await chat(behind.base, GREEDY, fan(7))).status, 200);
    assert.equal((await chat(behind.base, GREEDY, fan(7))).status, 200);
    assert.equal((await chat(behind.base, GREEDY, fan(7))).status, 429, 'fan 7 is throttled');
    assert.equal((await chat(behind.base, GREEDY, fan(8))).status, 200, 'fan 8, behind the same proxy, is not');

    // trust proxy off: a client that makes up X-Forwarded-For is still its socket's address
    const statuses = [];
    for (let n = 1; n <= 3; n++) statuses.push((await chat(direct.base, POLITE, fan(n))).status);
    assert.deepEqual(statuses, [200, 200, 429]);
  } finally {
    behind.close();
    direct.close();
  }
});
