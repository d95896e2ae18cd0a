// server.js reloads without downtime: when its symlinked MODEL (like models/current) changes,
// on SIGHUP, and on POST /admin/reload with the token from ADMIN_TOKEN.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, renameSync, rmSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { PYTHON, MODEL, REPO, TEST_ARGS, sleep } from '../testlib/helpers.js';

const SERVER = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'server.js');
const MODEL_4BIT = path.join(REPO, 'models', 'tiny-mistral-4bit');

/** Points `link` at `to` atomically (a new link renamed over the old one), as make promote does. */
function pointLink(link, to) {
  const tmp = `${link}.tmp-${process.pid}`;
  symlinkSync(to, tmp);
  renameSync(tmp, link);
}

test('server.js follows a symlinked model, reloads on SIGHUP and on an authorised POST /admin/reload', async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'farense-current-'));
  const current = path.join(dir, 'current');
  pointLink(current, MODEL);
  const child = spawn(process.execPath, [SERVER], {
    env: { ...process.env, PORT: '0', MODEL: current, PYTHON, ADMIN_TOKEN: 's3cret', FOLLOW_INTERVAL_MS: '100', WORKER_ARGS: TEST_ARGS.join(' ') },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  t.after(() => { if (child.exitCode === null) child.kill('SIGKILL'); rmSync(dir, { recursive: true, force: true }); });
  let stdout = '';
  const logs = [];
  child.stdout.setEncoding('utf8').on('data', (d) => { stdout += d; });
  let buf = '';
  child.stderr.setEncoding('utf8').on('data', (d) => {
    buf += d;
    const lines = buf.split('\n');
    buf = lines.pop();
    for (const l of lines) { try { logs.push(JSON.parse(l)); } catch { /* worker stderr */ } }
  });
  const waitFor = async (pred, what, ms = 60_000) => {
    for (const end = Date.now() + ms; ;) {
      const found = pred();
      if (found) return found;
      if (Date.now() > end || child.exitCode !== null) throw new Error(`no ${what}; logs: ${JSON.stringify(logs.slice(-5))}`);
      await sleep(20);
    }
  };
  const reloaded = (n) => waitFor(() => logs.filter((l) => l.msg === 'worker reloaded')[n - 1], `reload ${n}`);
  const url = (await waitFor(() => stdout.match(/listening on (http:\/\/127\.0\.0\.1:\d+)/), 'listening line'))[1];
  const first = await waitFor(() => logs.find((l) => l.msg === 'worker ready'), 'worker ready');
  assert.equal(first.model, MODEL, 'the worker got the link target');
  const chat = () => fetch(`${url}/api/chat`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ message: 'Olá', max_tokens: 3 }) });

  // A long chat in flight while the link changes: it is answered (by the old worker).
  const inFlight = fetch(`${url}/api/chat`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ message: 'Olá', max_tokens: 300 }) });
  await sleep(200);
  pointLink(current, MODEL_4BIT);
  const r1 = await reloaded(1);
  assert.equal(r1.model, MODEL_4BIT);
  assert.match(r1.why, /changed/);
  assert.equal((await inFlight).status, 200);
  assert.equal((await chat()).status, 200);

  child.kill('SIGHUP');
  assert.equal((await reloaded(2)).why, 'SIGHUP');

  const admin = (token) => fetch(`${url}/admin/reload`, { method: 'POST', headers: token ? { authorization: `Bearer ${token}` } : {} });
  assert.equal((await admin(null)).status, 401);
  assert.equal((await admin('wrong')).status, 401);
  const res = await admin('s3cret');
  assert.equal(res.status, 200);
  const body = await res.json();
  assert.equal(body.ok, true);
  assert.equal(body.model, MODEL_4BIT);
  assert.equal((await reloaded(3)).why, 'POST /admin/reload');
  assert.equal((await chat()).status, 200);

  child.kill('SIGTERM');
  const [code] = await once(child, 'exit');
  assert.equal(code, 0);
});
