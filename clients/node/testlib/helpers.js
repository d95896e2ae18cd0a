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

/** The tiny model's window is 32768 tokens; tests that reach the context use 2048 (fast). */
export const TEST_ARGS = ['--context-length', '2048'];

/** With TEST_ENV, a request whose last message contains FAULT fails inside the worker. */
export const FAULT = 'BOOM-TEST-FAULT';
TEST_ENV.WORKER_TEST_FAULT = FAULT;
