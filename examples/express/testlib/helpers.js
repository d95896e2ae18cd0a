// Shared test helpers (not a test file: node --test runs files under test/ only).
import { readFileSync, existsSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import Ajv2020 from 'ajv/dist/2020.js';

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
export const PYTHON = process.env.PYTHON || path.join(REPO, '.venv', 'bin', 'python');
export const MODEL = path.join(REPO, 'models', 'tiny-mistral');

if (!existsSync(path.join(MODEL, 'config.json'))) {
  throw new Error(`test model missing: ${MODEL} (run make tiny-model)`);
}

const schema = JSON.parse(readFileSync(path.join(REPO, 'docs', 'protocol.schema.json'), 'utf8'));
const ajv = new Ajv2020({ allErrors: true, strict: false });
ajv.addSchema(schema);
const validateOutput = ajv.getSchema(schema.$id);
const validateRequest = ajv.getSchema(`${schema.$id}#/$defs/request`);

/**
 * Collects every message a worker writes and every request the client sends, validating
 * each against docs/protocol.schema.json. `invalid` lists the failures.
 */
export function protocolRecorder() {
  const rec = {
    messages: [],
    sent: [],
    invalid: [],
    onMessage(msg) {
      rec.messages.push(msg);
      if (!validateOutput(msg)) rec.invalid.push({ dir: 'out', msg, errors: ajv.errorsText(validateOutput.errors) });
    },
    onSend(req) {
      rec.sent.push(req);
      if (!validateRequest(req)) {
        if (rec.expectInvalid) rec.expectedInvalid.push(req);
        else rec.invalid.push({ dir: 'in', msg: req, errors: ajv.errorsText(validateRequest.errors) });
      }
    },
    /** Set while a test sends requests that are invalid on purpose. */
    expectInvalid: false,
    /** Requests sent while expectInvalid was set that the schema rejected. */
    expectedInvalid: [],
    /** Attach to a Worker or Pool created with onMessage: rec.onMessage. */
    attachSend(emitter) {
      emitter.on('send', rec.onSend);
      return rec;
    },
    /** Waits for a message matching pred (already received or future). */
    waitFor(pred, timeoutMs = 30_000) {
      const found = rec.messages.find(pred);
      if (found) return Promise.resolve(found);
      return new Promise((resolve, reject) => {
        const t = setTimeout(() => { rec._w.delete(w); reject(new Error('timed out waiting for a message')); }, timeoutMs);
        const w = (m) => { if (pred(m)) { clearTimeout(t); rec._w.delete(w); resolve(m); } };
        rec._w.add(w);
      });
    },
    _w: new Set(),
  };
  const orig = rec.onMessage;
  rec.onMessage = (msg) => { orig(msg); for (const w of [...rec._w]) w(msg); };
  return rec;
}

/** True while a process with this pid exists. */
export function alive(pid) {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    if (err.code === 'ESRCH') return false;
    throw err;
  }
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Worker test hook: generation ends only by max_tokens, a stop string or cancel, so long
 * requests surely still run when a test aborts them (worker/engine.py). */
export const TEST_ENV = { WORKER_TEST_IGNORE_EOS: '1' };

/** With TEST_ENV, a request whose last message contains FAULT fails inside the worker. */
export const FAULT = 'BOOM-TEST-FAULT';
TEST_ENV.WORKER_TEST_FAULT = FAULT;

/**
 * Reads a Server-Sent Events body (a fetch Response or an http.IncomingMessage) and returns
 * the events as { event, data, at } with `at` the performance.now() when the chunk arrived.
 * `onEvent` may return true to stop reading.
 */
export async function readSse(body, onEvent = () => false) {
  const events = [];
  let buf = '';
  const decoder = new TextDecoder();
  for await (const chunk of body) {
    const at = performance.now();
    buf += typeof chunk === 'string' ? chunk : decoder.decode(chunk, { stream: true });
    let sep;
    while ((sep = buf.indexOf('\n\n')) !== -1) {
      const raw = buf.slice(0, sep);
      buf = buf.slice(sep + 2);
      const ev = { event: 'message', data: '', at, chunk: events.length };
      for (const line of raw.split('\n')) {
        if (line.startsWith('event: ')) ev.event = line.slice(7);
        else if (line.startsWith('data: ')) ev.data += line.slice(6);
      }
      ev.data = JSON.parse(ev.data);
      events.push(ev);
      if (onEvent(ev, events)) return events;
    }
  }
  return events;
}

/** Strings that must never reach a browser. */
export function assertNoInternals(assert, text) {
  assert.doesNotMatch(text, /\/work\/|\/home\/|node_modules|\.py\b|Traceback|\bat [\w.<>]+ \(|Error:|stack/i, `no internals in ${text}`);
}
