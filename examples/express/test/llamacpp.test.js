// The Express example unchanged on the llama.cpp engine: WORKER_ARGS="--engine llamacpp --gguf F"
// starts the worker on a GGUF of the tiny model (train/fuse_gguf.py's export), and a chat
// streams through /api/chat/stream as it does from the mlx engine.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { PYTHON, MODEL, REPO, readSse, sleep } from '../testlib/helpers.js';

const SERVER = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'server.js');
const probe = spawnSync(PYTHON, ['-c', 'import sys; from core import llamacpp; sys.exit(0 if llamacpp.installed() else 3)'], { cwd: REPO });
const skip = probe.status === 0 ? false : 'llama.cpp is not installed in .venv: make llamacpp';

test('the Express example streams a chat from the llama.cpp engine', { skip, timeout: 300_000 }, async (t) => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'llamacpp-gguf-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const exported = spawnSync(PYTHON, ['-m', 'train.fuse_gguf', '--model', MODEL, '--out', dir], { cwd: REPO, encoding: 'utf8' });
  assert.equal(exported.status, 0, exported.stderr);
  const gguf = path.join(dir, 'ggml-model-f16.gguf');

  const child = spawn(process.execPath, [SERVER], {
    env: { ...process.env, PORT: '0', MODEL, PYTHON, WORKER_ARGS: `--engine llamacpp --gguf ${gguf}` },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  t.after(() => { if (child.exitCode === null) child.kill('SIGKILL'); });
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (d) => { stdout += d; });
  child.stderr.setEncoding('utf8').on('data', (d) => { stderr += d; });
  const waitFor = async (pred, what, ms = 120_000) => {
    const end = Date.now() + ms;
    for (;;) {
      const m = pred();
      if (m) return m;
      if (Date.now() > end || child.exitCode !== null) throw new Error(`no ${what}; stdout: ${stdout}\nstderr: ${stderr}`);
      await sleep(20);
    }
  };
  const url = (await waitFor(() => stdout.match(/listening on (http:\/\/127\.0\.0\.1:\d+)/), 'listening line'))[1];
  const readyLine = await waitFor(() => stderr.split('\n').find((l) => l.includes('"worker ready"')), 'worker ready log');
  const { pid } = JSON.parse(readyLine);
  const cmd = spawnSync('ps', ['-o', 'args=', '-p', String(pid)], { encoding: 'utf8' }).stdout;
  assert.match(cmd, /-m worker .*--engine llamacpp --gguf /, 'the worker that answers is the llama.cpp one');

  const res = await fetch(`${url}/api/chat/stream`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ message: 'Olá! Quem fundou o Farense?', max_tokens: 12 }),
  });
  assert.equal(res.status, 200);
  const events = await readSse(res.body);
  const texts = events.filter((e) => e.event === 'message');
  const done = events.find((e) => e.event === 'done');
  assert.ok(done, JSON.stringify(events));
  assert.ok(texts.length >= 1 && done.data.usage.completion_tokens >= 1, JSON.stringify(events));

  child.kill('SIGTERM');
  await new Promise((r) => child.once('exit', r));
});
