// The chat page's pure logic (public/conversation.js), under Node: trimming to the server's
// limits, the stored conversation read back, Server-Sent Events split across chunks.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { STORAGE_KEY, bodyBytes, fitToLimits, forServer, load, readEvents, save } from '../public/conversation.js';

const turns = (n, size = 10) => Array.from({ length: n }, (_, i) => ({ role: i % 2 ? 'assistant' : 'user', content: `${i} ${'é'.repeat(size)}` }));

test('fitToLimits keeps the newest turns within both limits, starting with a user message', () => {
  const all = turns(81);
  const { messages, dropped } = fitToLimits(all, { maxMessages: 64, maxBodyBytes: 1 << 20 });
  assert.equal(messages.length, 63, '64 would start with an assistant message');
  assert.equal(messages[0].role, 'user');
  assert.equal(dropped, 18);
  assert.deepEqual(messages, all.slice(18));

  const big = turns(21, 1000); // ~2 kB each in UTF-8 (é is two bytes)
  const limit = 9000;
  const fitted = fitToLimits(big, { maxMessages: 64, maxBodyBytes: limit });
  assert.ok(bodyBytes(fitted.messages) <= limit);
  assert.ok(bodyBytes(big.slice(fitted.dropped - 2)) > limit, 'no more than needed was dropped');
  assert.equal(fitted.messages[0].role, 'user');
  assert.deepEqual(fitted.messages.at(-1), big.at(-1));

  assert.deepEqual(fitToLimits(turns(1, 5000), { maxMessages: 64, maxBodyBytes: 1000 }), { error: 'too_large' });
  assert.equal(bodyBytes([{ role: 'user', content: 'é' }]), Buffer.byteLength(JSON.stringify({ messages: [{ role: 'user', content: 'é' }] })));
});

test('load and save: what the page stored comes back; anything else is an empty conversation', () => {
  const store = new Map();
  const storage = { getItem: (k) => store.get(k) ?? null, setItem: (k, v) => store.set(k, v) };
  assert.deepEqual(load(storage), []);
  const conv = [{ role: 'user', content: 'Olá <b>' }, { role: 'assistant', content: 'Olá!', meta: { ttft_ms: 12 } }];
  assert.equal(save(storage, conv), true);
  assert.deepEqual(load(storage), conv);
  assert.deepEqual(forServer(conv), [{ role: 'user', content: 'Olá <b>' }, { role: 'assistant', content: 'Olá!' }]);
  for (const bad of ['{', '[]', '{"messages": 3}', 'null']) {
    store.set(STORAGE_KEY, bad);
    assert.deepEqual(load(storage), [], bad);
  }
  store.set(STORAGE_KEY, JSON.stringify({ messages: [{ role: 'system', content: 'x' }, { role: 'user', content: 5 }, { role: 'user', content: 'ok' }] }));
  assert.deepEqual(load(storage), [{ role: 'user', content: 'ok' }]);
  const full = { getItem: () => null, setItem: () => { throw new Error('QuotaExceededError'); } };
  assert.equal(save(full, conv), false);
});

test('readEvents: events split anywhere across chunks, multi-byte characters included', async () => {
  const wire = 'data: {"text":"Fa"}\n\ndata: {"text":"ro é"}\n\nevent: done\ndata: {"usage":{"completion_tokens":2}}\n\n';
  const bytes = new TextEncoder().encode(wire);
  for (const step of [1, 2, 3, 7, bytes.length]) {
    const chunks = [];
    for (let i = 0; i < bytes.length; i += step) chunks.push(bytes.slice(i, i + step));
    const reader = { read: async () => (chunks.length ? { value: chunks.shift(), done: false } : { done: true }) };
    const seen = [];
    await readEvents(reader, (event, data) => seen.push([event, data]));
    assert.deepEqual(seen, [['message', { text: 'Fa' }], ['message', { text: 'ro é' }], ['done', { usage: { completion_tokens: 2 } }]], `chunks of ${step}`);
  }
});
