// Pure-logic unit tests (no worker process): line splitting and backoff computation.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { LineSplitter, backoffDelay } from '../index.js';

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
