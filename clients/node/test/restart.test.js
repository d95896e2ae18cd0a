// Crash recovery, close() and start failures, against the real worker.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { startWorker, createWorker, WorkerExitedError } from '../index.js';
import { PYTHON, MODEL, TEST_ENV, protocolRecorder, alive, sleep } from '../testlib/helpers.js';

const LONG = { prompt: 'Conta a história do Sporting Clube Farense.', max_tokens: 2000 };

test('SIGKILL mid-request: pending requests reject with WorkerExitedError, the worker restarts', async () => {
  const rec = protocolRecorder();
  const worker = await startWorker({ python: PYTHON, model: MODEL, env: TEST_ENV, onMessage: rec.onMessage, restart: { baseDelayMs: 50 } });
  rec.attachSend(worker);
  try {
    const events = [];
    worker.on('restart', (e) => events.push(['restart', e]));
    worker.on('exit', (e) => events.push(['exit', e]));
    const oldPid = worker.pid;
    const p1 = worker.complete(LONG);
    const s2 = worker.stream(LONG);
    const it = s2[Symbol.asyncIterator]();
    assert.equal((await it.next()).done, false, 'the stream is generating');
    process.kill(oldPid, 'SIGKILL');

    const e1 = await p1.then(() => null, (e) => e);
    assert.ok(e1 instanceof WorkerExitedError, String(e1));
    assert.equal(e1.code, 'worker_exited');
    assert.equal(e1.signal, 'SIGKILL');
    assert.match(e1.message, /SIGKILL/);
    await assert.rejects(async () => { for (;;) { const r = await it.next(); if (r.done) break; } }, WorkerExitedError);
    await assert.rejects(s2.done, WorkerExitedError);

    // made while restarting: waits for ready, then succeeds on the new process
    assert.notEqual(worker.state, 'ready');
    const done = await worker.complete({ prompt: 'Olá', max_tokens: 8 });
    assert.equal(done.type, 'done');
    assert.ok(worker.pid && worker.pid !== oldPid);
    assert.equal(alive(oldPid), false);
    assert.equal(worker.restarts, 1);
    assert.deepEqual(events.map((e) => e[0]), ['exit', 'restart']);
    assert.equal(events[0][1].signal, 'SIGKILL');
    assert.equal(rec.messages.filter((m) => m.type === 'ready').length, 2);
  } finally {
    await worker.close();
  }
  assert.deepEqual(rec.invalid, []);
});

test('close(): pending requests reject, no child process is left, no restart', async () => {
  const rec = protocolRecorder();
  const worker = await startWorker({ python: PYTHON, model: MODEL, env: TEST_ENV, onMessage: rec.onMessage });
  rec.attachSend(worker);
  const pid = worker.pid;
  let restarted = false;
  worker.on('restart', () => { restarted = true; });
  const exits = [];
  worker.on('exit', (e) => exits.push(e));
  const pending = worker.complete(LONG).then(() => null, (e) => e);
  await sleep(200);
  await worker.close({ graceMs: 10_000 });
  const err = await pending;
  assert.ok(err instanceof WorkerExitedError, String(err));
  assert.equal(err.closed, true);
  assert.throws(() => process.kill(pid, 0), { code: 'ESRCH' });
  assert.equal(worker.state, 'closed');
  assert.equal(worker.pid, null);
  assert.deepEqual(exits, [{ code: 0, signal: null, pid }], 'the worker honoured shutdown (no SIGKILL)');
  assert.deepEqual(rec.sent.at(-1), { op: 'shutdown' });
  await assert.rejects(worker.complete({ prompt: 'x' }), { name: 'WorkerExitedError' });
  await worker.close(); // idempotent
  await sleep(300);
  assert.equal(restarted, false);
  assert.deepEqual(rec.invalid, []);
});

test('close() kills a worker that ignores shutdown after the grace period', async () => {
  const worker = await startWorker({ python: PYTHON, model: MODEL });
  const pid = worker.pid;
  process.kill(pid, 'SIGSTOP'); // frozen: cannot read shutdown nor EOF
  try {
    const t0 = Date.now();
    await worker.close({ graceMs: 500 });
    assert.ok(Date.now() - t0 >= 450);
    assert.equal(alive(pid), false);
  } finally {
    try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ }
  }
});

test('a worker that cannot start rejects startWorker with the reason', async () => {
  await assert.rejects(
    startWorker({ python: '/nonexistent/python3' }),
    (err) => err instanceof WorkerExitedError && /could not be started/.test(err.message));
  const err = await startWorker({ python: PYTHON, model: '/nonexistent/model-dir' }).then(() => null, (e) => e);
  assert.ok(err instanceof WorkerExitedError, String(err));
  assert.match(err.message, /exited with code [1-9]/);
});

test('restarts give up after maxRetries consecutive failures; requests waiting then reject', async () => {
  const worker = createWorker({ python: PYTHON, model: MODEL, env: TEST_ENV, restart: { maxRetries: 2, baseDelayMs: 20 } });
  const errors = [];
  worker.on('error', (e) => errors.push(e));
  const restarts = [];
  worker.on('restart', (e) => restarts.push(e));
  // made before start: waits for ready
  const early = worker.complete({ prompt: 'Olá', max_tokens: 4 });
  await worker.start();
  assert.equal((await early).type, 'done');
  try {
    worker.options.model = '/nonexistent/model-dir'; // every restart now fails
    process.kill(worker.pid, 'SIGKILL');
    await new Promise((r) => worker.once('restart', r));
    const waiting = worker.complete({ prompt: 'Olá', max_tokens: 4 });
    const err = await waiting.then(() => null, (e) => e);
    assert.ok(err instanceof WorkerExitedError, String(err));
    assert.match(err.message, /gave up/);
    assert.equal(worker.state, 'failed');
    assert.equal(restarts.length, 2);
    assert.deepEqual(restarts.map((r) => r.delayMs), [20, 40]);
    assert.ok(errors.some((e) => /gave up/.test(e.message)));
    await assert.rejects(worker.complete({ prompt: 'x' }), WorkerExitedError);
  } finally {
    await worker.close();
  }
});
