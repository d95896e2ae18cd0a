// startPool: dispatch to the worker with the fewest requests in flight.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { startPool } from '../index.js';
import { PYTHON, MODEL, TEST_ENV, protocolRecorder, alive } from '../testlib/helpers.js';

const LONG = { prompt: 'Conta a história do Sporting Clube Farense.', max_tokens: 2000 };

test('pool of 2: fewest-in-flight dispatch, same API, close() stops every worker', async () => {
  const rec = protocolRecorder();
  const pool = await startPool({ size: 2, python: PYTHON, model: MODEL, env: TEST_ENV, onMessage: rec.onMessage });
  rec.attachSend(pool);
  const pids = pool.workers.map((w) => w.pid);
  try {
    assert.equal(pool.size, 2);
    assert.equal(new Set(pids).size, 2);
    const [a, b] = pool.workers;

    const s1 = pool.stream(LONG);
    assert.deepEqual([a.inFlight, b.inFlight], [1, 0]);
    const s2 = pool.stream(LONG);
    assert.deepEqual([a.inFlight, b.inFlight], [1, 1], 'second request goes to the idle worker');
    const s3 = pool.stream(LONG);
    assert.equal(a.inFlight + b.inFlight, 3);
    // the next one goes to whichever has 1
    const least = a.inFlight < b.inFlight ? a : b;
    const c = pool.complete({ prompt: 'Olá', max_tokens: 8 });
    assert.equal(least.inFlight, 2);
    assert.equal((await c).type, 'done');

    for (const s of [s1, s2, s3]) s.cancel();
    for (const s of [s1, s2, s3]) assert.equal((await s.done).finish_reason, 'cancelled');
    assert.equal(pool.inFlight, 0);

    const dones = await Promise.all(Array.from({ length: 6 }, (_, i) => pool.complete({ prompt: `Olá ${i}`, max_tokens: 6 })));
    assert.equal(new Set(dones.map((d) => d.id)).size, 6);
    // both workers served requests
    const stats = await pool.stats();
    assert.equal(stats.length, 2);
    assert.ok(stats.every((s) => s.served >= 3), JSON.stringify(stats.map((s) => s.served)));
    const pings = await pool.ping();
    assert.equal(pings.length, 2);
  } finally {
    await pool.close();
  }
  for (const pid of pids) assert.equal(alive(pid), false);
  assert.deepEqual(rec.invalid, []);
});
