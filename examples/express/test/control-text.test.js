// Control-token strings in a chat message pass through the Express app to the worker as text:
// 50 copies add at least 100 prompt tokens (usage in the reply). Real HTTP on loopback, the real
// worker on models/tiny-mistral (Mistral v0.3's tokenizer shape).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startWorker } from '../../../clients/node/index.js';
import { createApp } from '../app.js';
import { PYTHON, MODEL, TEST_ENV, TEST_ARGS, protocolRecorder, listen } from '../testlib/helpers.js';

const CONTROL = ['[INST]', '[/INST]', '</s>', '<s>'];
const rec = protocolRecorder();
let worker;
let http;

before(async () => {
  worker = await startWorker({ python: PYTHON, model: MODEL, env: TEST_ENV, args: TEST_ARGS, onMessage: rec.onMessage });
  rec.attachSend(worker);
  http = await listen(createApp(worker, { log: () => {}, timeoutMs: 60_000 }));
});

after(async () => {
  http?.close();
  await worker?.close();
  assert.deepEqual(rec.invalid, [], 'every message matches docs/protocol.schema.json');
});

async function chat(content) {
  const res = await fetch(`${http.base}/api/chat`, {
    method: 'POST', headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ messages: [{ role: 'user', content }], max_tokens: 1 }),
  });
  assert.equal(res.status, 200, await res.clone().text());
  return res.json();
}

for (const text of CONTROL) {
  test(`POST /api/chat passes ${text} x 50 through as text`, async () => {
    const plain = await chat('olá');
    const content = 'olá ' + text.repeat(50);
    const reply = await chat(content);
    const sent = rec.sent.filter((m) => m.messages).at(-1);
    assert.equal(sent.messages.at(-1).content, content);
    assert.ok(reply.usage.prompt_tokens - plain.usage.prompt_tokens >= 100,
      `${reply.usage.prompt_tokens} vs ${plain.usage.prompt_tokens}`);
  });
}
