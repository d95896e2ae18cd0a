// server.js as a real process: environment configuration, /healthz, a chat, clean SIGTERM.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { PYTHON, MODEL, alive, sleep } from '../testlib/helpers.js';

const SERVER = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'server.js');

test('node server.js: PORT/MODEL/PYTHON from the environment, healthz, chat, SIGTERM stops the worker', async (t) => {
  const child = spawn(process.execPath, [SERVER], {
    cwd: '/', // paths come from the environment and the module's location, not the cwd
    env: { ...process.env, PORT: '0', MODEL, PYTHON },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  t.after(() => { if (child.exitCode === null) child.kill('SIGKILL'); });
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (d) => { stdout += d; });
  child.stderr.setEncoding('utf8').on('data', (d) => { stderr += d; });
  const waitFor = async (pred, what, ms = 60_000) => {
    const end = Date.now() + ms;
    for (;;) {
      const m = pred();
      if (m) return m;
      if (Date.now() > end || child.exitCode !== null) throw new Error(`no ${what}; stdout: ${stdout}\nstderr: ${stderr}`);
      await sleep(20);
    }
  };

  const url = (await waitFor(() => stdout.match(/listening on (http:\/\/127\.0\.0\.1:\d+)/), 'listening line'))[1];
  const first = await fetch(`${url}/healthz`);
  assert.ok([200, 503].includes(first.status));
  const readyLine = await waitFor(() => stderr.split('\n').find((l) => l.includes('"worker ready"')), 'worker ready log');
  const { pid } = JSON.parse(readyLine);
  assert.ok(alive(pid));
  const health = await fetch(`${url}/healthz`);
  assert.equal(health.status, 200);

  const res = await fetch(`${url}/api/chat`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ message: 'Olá! Quem fundou o Farense?', max_tokens: 8 }),
  });
  assert.equal(res.status, 200);
  const body = await res.json();
  assert.equal(typeof body.reply, 'string');
  assert.ok(body.usage.completion_tokens >= 1);

  child.kill('SIGTERM');
  const [code] = await once(child, 'exit');
  assert.equal(code, 0);
  assert.equal(alive(pid), false, 'the worker is gone');
});

test('node server.js: a bad RATE_LIMIT_* or TRUST_PROXY stops it at start, naming the variable', async () => {
  for (const [name, value, expected] of [
    ['RATE_LIMIT_PER_MINUTE', 'lots', /RATE_LIMIT_PER_MINUTE must be a whole number >= 0/],
    ['RATE_LIMIT_CONCURRENT', '-1', /RATE_LIMIT_CONCURRENT must be a whole number >= 0/],
    ['TRUST_PROXY', 'my-nginx', /TRUST_PROXY: invalid IP address: my-nginx/],
  ]) {
    const child = spawn(process.execPath, [SERVER], {
      env: { ...process.env, PORT: '0', MODEL, PYTHON, [name]: value },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d) => { stdout += d; });
    child.stderr.setEncoding('utf8').on('data', (d) => { stderr += d; });
    const [code] = await once(child, 'exit');
    assert.equal(code, 2, `${name}=${value}: ${stderr}`);
    assert.match(stderr, expected);
    assert.equal(stdout, '', 'it never listened');
  }
});
