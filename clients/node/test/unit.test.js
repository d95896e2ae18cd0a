// Pure-logic unit tests (no worker process): line splitting, backoff, the async queue.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { LineSplitter, backoffDelay } from '../index.js';
import { AsyncQueue } from '../queue.js';

test('LineSplitter: lines split across chunks, \\r\\n, blank lines', () => {
  const s = new LineSplitter();
  assert.deepEqual(s.push(Buffer.from('{"a":1}\n{"b"')), ['{"a":1}']);
  assert.deepEqual(s.push(Buffer.from(':2}\r\n\n  \n{"c":3}')), ['{"b":2}']);
  assert.deepEqual(s.push(Buffer.from('\n')), ['{"c":3}']);
  assert.deepEqual(s.end(), []);
});

test('LineSplitter: UTF-8 characters split between chunks', () => {
  const line = JSON.stringify({ text: 'Estádio de São Luís ✓ 🦁' }) + '\n';
  const bytes = Buffer.from(line, 'utf8');
  for (let cut = 1; cut < bytes.length; cut++) {
    const s = new LineSplitter();
    const out = [...s.push(bytes.subarray(0, cut)), ...s.push(bytes.subarray(cut)), ...s.end()];
    assert.deepEqual(out, [line.trimEnd()], `cut at ${cut}`);
  }
  // one byte at a time
  const s = new LineSplitter();
  const out = [];
  for (const b of bytes) out.push(...s.push(Buffer.from([b])));
  assert.deepEqual(out, [line.trimEnd()]);
});

test('LineSplitter: last line without newline is returned by end()', () => {
  const s = new LineSplitter();
  assert.deepEqual(s.push('x\ny'), ['x']);
  assert.deepEqual(s.end(), ['y']);
});

test('LineSplitter: an oversized line is dropped, the next one is kept', () => {
  const s = new LineSplitter({ maxLineChars: 10 });
  assert.deepEqual(s.push('0123456789abcdef'), []);
  assert.deepEqual(s.push('ghij\nok\n'), ['ok']);
  assert.equal(s.overflows, 1);
});

test('backoffDelay: exponential, capped', () => {
  const o = { baseDelayMs: 100, maxDelayMs: 1000 };
  assert.deepEqual([0, 1, 2, 3, 4, 5, 100].map((a) => backoffDelay(a, o)), [100, 200, 400, 800, 1000, 1000, 1000]);
  assert.equal(backoffDelay(0), 250);
});

test('AsyncQueue: values in order, then the end value; values pushed after end are refused', async () => {
  const q = new AsyncQueue();
  const first = q.next();
  q.push('a');
  q.push('b');
  q.end('fim');
  assert.equal(q.push('c'), false);
  assert.deepEqual(await first, { value: 'a', done: false });
  assert.deepEqual(await q.next(), { value: 'b', done: false });
  assert.deepEqual(await q.next(), { value: 'fim', done: true });
  assert.deepEqual(await q.next(), { value: 'fim', done: true });
});

test('AsyncQueue: fail() throws once after the queued values; close() drops them', async () => {
  const q = new AsyncQueue();
  q.push(1);
  q.fail(new Error('boom'));
  q.end('ignored');
  assert.deepEqual(await q.next(), { value: 1, done: false });
  await assert.rejects(q.next(), /boom/);
  assert.deepEqual(await q.next(), { value: undefined, done: true });
  const c = new AsyncQueue();
  c.push(1);
  c.close();
  assert.deepEqual(await c.next(), { value: undefined, done: true });
});
