// reload(): a new worker process takes new requests; those in flight finish on the old one.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { startWorker, startPool, WorkerError } from '../index.js';
import { PYTHON, MODEL, REPO, TEST_ENV, TEST_ARGS, protocolRecorder, alive, sleep } from '../testlib/helpers.js';

const MODEL_4BIT = path.join(REPO, 'models', 'tiny-mistral-4bit');
const opts = (rec) => ({ python: PYTHON, model: MODEL, env: TEST_ENV, args: TEST_ARGS, onMessage: rec.onMessage });

/** Every generation request sent got exactly one terminal message. */
function assertAnsweredOnce(rec) {
  const sent = rec.sent.filter((m) => m.id && !m.op).map((m) => m.id);
  const terminal = new Map();
  for (const m of rec.messages) {
    if ((m.type === 'done' || m.type === 'error') && m.id) terminal.set(m.id, (terminal.get(m.id) ?? 0) + 1);
  }
  for (const id of sent) assert.equal(terminal.get(id), 1, `request ${id}: ${terminal.get(id) ?? 0} terminal messages`);
  return sent.length;
}

test('200 requests in flight through a reload: each answered once, by the old or the new model', async () => {
  const rec = protocolRecorder();
  const worker = await startWorker(opts(rec));
  rec.attachSend(worker);
  const oldPid = worker.pid;
  const reloads = [];
  worker.on('reload', (e) => reloads.push(e));
  try {
    const before = Array.from({ length: 200 }, (_, i) => worker.complete({ prompt: `Olá ${i}`, max_tokens: 24 }));
    await rec.waitFor((m) => m.type === 'done');            // the old worker is busy serving them
    const ready = await worker.reload({ model: MODEL_4BIT });
    assert.equal(ready.model, MODEL_4BIT);
    assert.notEqual(worker.pid, oldPid);
    assert.equal(worker.info.model, MODEL_4BIT);
    const after = Array.from({ length: 20 }, (_, i) => worker.complete({ prompt: `Adeus ${i}`, max_tokens: 4 }));
    const doneBefore = await Promise.all(before);
    const doneAfter = await Promise.all(after);

    assert.ok(doneBefore.every((d) => d.type === 'done' && d.usage.completion_tokens === 24));
    const byModel = (ds, m) => ds.filter((d) => d.model === m).length;
    assert.equal(byModel(doneBefore, MODEL) + byModel(doneBefore, MODEL_4BIT), 200);
    assert.ok(byModel(doneBefore, MODEL) > 0, 'some finished on the old worker');
    assert.equal(byModel(doneAfter, MODEL_4BIT), 20, 'new requests go to the new worker');
    assert.equal(assertAnsweredOnce(rec), 220);
    assert.equal(reloads.length, 1);
    assert.equal(reloads[0].from.pid, oldPid);
    for (let i = 0; i < 200 && alive(oldPid); i++) await sleep(25);
    assert.equal(alive(oldPid), false, 'the old worker stopped once its requests were answered');
    assert.equal(worker.reloads, 1);
  } finally {
    await worker.close();
  }
  assert.deepEqual(rec.invalid, []);
});

test('a reload that cannot start keeps the old worker serving and rejects with the reason', async () => {
  const rec = protocolRecorder();
  const worker = await startWorker(opts(rec));
  rec.attachSend(worker);
  const pid = worker.pid;
  try {
    const inFlight = worker.complete({ prompt: 'Olá', max_tokens: 30 });
    const err = await worker.reload({ model: '/nonexistent/model-dir' }).then(() => null, (e) => e);
    assert.ok(err instanceof WorkerError, String(err));
    assert.equal(err.code, 'reload_failed');
    assert.match(err.message, /reload: the new worker process \d+ exited with code 2/);
    assert.equal(worker.pid, pid);
    assert.equal(worker.info.model, MODEL);
    assert.equal((await inFlight).model, MODEL);
    assert.equal((await worker.complete({ prompt: 'Olá', max_tokens: 3 })).model, MODEL);
  } finally {
    await worker.close();
  }
  assert.equal(alive(pid), false);
});

test('pool.reload switches every worker, or none when one new worker fails', async () => {
  const rec = protocolRecorder();
  const pool = await startPool({ size: 2, ...opts(rec) });
  try {
    const err = await pool.reload({ model: '/nonexistent/model-dir' }).then(() => null, (e) => e);
    assert.equal(err?.code, 'reload_failed');
    assert.deepEqual(pool.workers.map((w) => w.info.model), [MODEL, MODEL]);
    const streams = [pool.stream({ prompt: 'Olá', max_tokens: 40 }), pool.stream({ prompt: 'Olá', max_tokens: 40 })];
    const readies = await pool.reload({ model: MODEL_4BIT });
    assert.deepEqual(readies.map((r) => r.model), [MODEL_4BIT, MODEL_4BIT]);
    for (const s of streams) assert.equal((await s.done).model, MODEL);
    const done = await Promise.all([1, 2, 3, 4].map((i) => pool.complete({ prompt: `Olá ${i}`, max_tokens: 3 })));
    assert.ok(done.every((d) => d.model === MODEL_4BIT));
  } finally {
    await pool.close();
  }
});
