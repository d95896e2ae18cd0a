// Control-token strings typed by a user ("[INST]", "</s>", ...) reach the worker unchanged and
// are tokenized there as text: 50 copies add at least 100 prompt tokens (as control tokens they
// would add 50). The real worker on models/tiny-mistral, whose tokenizer is Mistral v0.3's shape.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startWorker } from '../index.js';
import { PYTHON, MODEL, TEST_ENV, TEST_ARGS, protocolRecorder } from '../testlib/helpers.js';

const CONTROL = ['[INST]', '[/INST]', '</s>', '<s>', '[TOOL_CALLS]'];
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

for (const text of CONTROL) {
  test(`${text} x 50 is sent unchanged and counted as text`, async () => {
    const base = await worker.complete({ messages: [{ role: 'user', content: 'olá' }], max_tokens: 1 });
    const content = 'olá ' + text.repeat(50);
    const done = await worker.complete({ messages: [{ role: 'user', content }], max_tokens: 1 });
    assert.equal(rec.sent.find((m) => m.id === done.id).messages[0].content, content);
    assert.ok(done.usage.prompt_tokens - base.usage.prompt_tokens >= 100,
      `${done.usage.prompt_tokens} vs ${base.usage.prompt_tokens}`);
  });
}
