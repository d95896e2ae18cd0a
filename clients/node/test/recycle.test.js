// options.recycle (recycle.js): a fresh worker process replaces the current one after N
// requests or above a memory ceiling, through the zero-downtime reload; nothing is dropped.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { Worker, startWorker, startPool } from '../index.js';
import { PYTHON, MODEL, TEST_ENV, TEST_ARGS, protocolRecorder, alive, sleep } from '../testlib/helpers.js';

const opts = (rec, recycle) => ({ python: PYTHON, model: MODEL, env: TEST_ENV, args: TEST_ARGS, onMessage: rec.onMessage, recycle });

/** Every generation request sent got exactly one terminal message, a `done`. */
function assertAnsweredOnce(rec) {
  const sent = rec.sent.filter((m) => m.id && !m.op).map((m) => m.id);
  const terminal = new Map();
  for (const m of rec.messages) {
    if ((m.type === 'done' || m.type === 'error') && m.id) {
      assert.equal(m.type, 'done', JSON.stringify(m));
      terminal.set(m.id, (terminal.get(m.id) ?? 0) + 1);
    }
  }
  for (const id of sent) assert.equal(terminal.get(id), 1, `request ${id}: ${terminal.get(id) ?? 0} terminal messages`);
  return sent.length;
}

test('after maxRequests the process is replaced while requests keep coming: none dropped', async () => {
  const rec = protocolRecorder();
  const worker = await startWorker(opts(rec, { maxRequests: 8 }));
  rec.attachSend(worker);
  const recycles = [];
  worker.on('recycle', (e) => recycles.push(e));
  const pids = [worker.pid];
  worker.on('ready', (r) => pids.push(r.pid));
  try {
    // a steady stream, streamed and not, some long enough to be in flight across a switch
    const replies = [];
    const deadline = performance.now() + 180_000; // two worker starts on a loaded machine
    for (let i = 0; recycles.length < 2; i++) {
      assert.ok(performance.now() < deadline, `only ${recycles.length} recycles after ${i} requests`);
      if (i % 2) replies.push(worker.complete({ prompt: `Olá ${i}`, max_tokens: 1 + (i % 20) }));
      else {
        const s = worker.stream({ prompt: `Bom dia ${i}`, max_tokens: 1 + (i % 20) });
        replies.push((async () => { let t = ''; for await (const x of s) t += x; const d = await s.done; assert.equal(t, d.text); return d; })());
      }
      await sleep(15);
    }
    const done = await Promise.all(replies);
    assert.ok(done.every((d) => d.type === 'done' && d.finish_reason === 'length'));
    assert.equal(assertAnsweredOnce(rec), replies.length);
    assert.deepEqual(recycles.map((e) => e.reason), ['requests', 'requests']);
    assert.ok(recycles.every((e) => e.requests >= 8));
    assert.equal(recycles[0].from, pids[0]);
    assert.equal(recycles[1].from, recycles[0].to);
    assert.equal(worker.recycles, 2);
    assert.equal(worker.reloads, 2);
    for (const pid of [recycles[0].from, recycles[1].from]) {
      for (let i = 0; i < 200 && alive(pid); i++) await sleep(25);
      assert.equal(alive(pid), false, `the replaced process ${pid} stopped once its requests were answered`);
    }
  } finally {
    await worker.close();
  }
  assert.deepEqual(rec.invalid, []);
});

test('above maxResidentBytes (read from stats) the process is replaced; requests in flight finish', async () => {
  const rec = protocolRecorder();
  // a ceiling every worker is above: it recycles at the first check
  const worker = await startWorker(opts(rec, { maxResidentBytes: 1 << 20, checkIntervalMs: 100 }));
  rec.attachSend(worker);
  const first = worker.pid;
  try {
    const inFlight = Array.from({ length: 6 }, (_, i) => worker.complete({ prompt: `Olá ${i}`, max_tokens: 40 }));
    const [event] = await once(worker, 'recycle');
    assert.equal(event.reason, 'memory');
    assert.equal(event.from, first);
    assert.ok(event.residentBytes > 1 << 20, String(event.residentBytes));
    assert.notEqual(worker.pid, first);
    const after = await worker.complete({ prompt: 'Adeus', max_tokens: 2 });
    assert.equal(after.type, 'done');
    const done = await Promise.all(inFlight);
    assert.ok(done.every((d) => d.usage.completion_tokens === 40));
    assertAnsweredOnce(rec);
  } finally {
    await worker.close();
  }
  assert.equal(alive(first), false);
});

test('off by default; bad limits are refused; a pool recycles each worker on its own', async () => {
  assert.equal(new Worker({})._recycler, null);
  for (const bad of [0, -1, Number.NaN, '5']) {
    assert.throws(() => new Worker({ recycle: { maxRequests: bad } }), /recycle\.maxRequests must be a positive number/);
  }
  const rec = protocolRecorder();
  const pool = await startPool({ size: 2, ...opts(rec, { maxRequests: 3 }) });
  rec.attachSend(pool);
  const events = [];
  pool.on('recycle', (e, w) => events.push([e.reason, w]));
  try {
    for (let wave = 0; wave < 3; wave++) {
      await Promise.all(Array.from({ length: 4 }, (_, i) => pool.complete({ prompt: `Olá ${wave} ${i}`, max_tokens: 2 })));
    }
    for (let i = 0; i < 400 && events.length < 2; i++) await sleep(25);
    assert.ok(events.length >= 2, `${events.length} recycles`);
    assert.ok(new Set(events.map(([, w]) => w)).size === 2, 'both workers recycled');
    assertAnsweredOnce(rec);
  } finally {
    await pool.close();
  }
});
