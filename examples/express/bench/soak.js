// The HTTP half of `make soak` (python -m bench.soak --via http runs it): the soak plan's
// traffic through the Express example (this process: createApp + a real worker, on a
// loopback port), over HTTP with fetch. Streamed requests go to /api/chat/stream (SSE), the
// rest to /api/chat; a planned cancel is the client going away (the fetch aborted after a few
// SSE events, or shortly after sending), which the app turns into a worker cancel; garbage
// lines are sent as bodies (400 expected).
//
//   node examples/express/bench/soak.js --plan plan.jsonl [--model models/tiny-mistral]
//     [--budget 67108864] [--concurrency 16] [--stats-every 25] [--worker-arg=--flag ...]
//
// stdout: one JSON line per memory sample {"type":"stats","answered":n,"idle":false,"stats":{...}} (the
// worker's stats message), then {"type":"summary",...} (bench/soak_driver.py reads both).
// Progress goes to stderr.
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { REPO_ROOT, startWorker } from '../../../clients/node/index.js';
import { createApp } from '../app.js';

function options() {
  const { values } = parseArgs({
    options: {
      plan: { type: 'string' },
      model: { type: 'string', default: 'models/tiny-mistral' },
      budget: { type: 'string', default: String(64 * 2 ** 20) },
      concurrency: { type: 'string', default: '16' },
      'stats-every': { type: 'string', default: '25' },
      'worker-arg': { type: 'string', multiple: true, default: [] },
    },
  });
  if (!values.plan) throw new Error('--plan is required (python -m bench.soak --via http writes it)');
  return {
    plan: readFileSync(values.plan, 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l)),
    model: path.resolve(REPO_ROOT, values.model),
    budget: Number(values.budget),
    concurrency: Number(values.concurrency),
    statsEvery: Number(values['stats-every']),
    workerArgs: values['worker-arg'],
  };
}

const emit = (obj) => process.stdout.write(`${JSON.stringify(obj)}\n`);

/** The SSE events of a response body, as { event, data } (data parsed). */
async function* sseEvents(body) {
  const decoder = new TextDecoder();
  let buf = '';
  for await (const chunk of body) {
    buf += decoder.decode(chunk, { stream: true });
    let sep;
    while ((sep = buf.indexOf('\n\n')) !== -1) {
      const raw = buf.slice(0, sep);
      buf = buf.slice(sep + 2);
      let event = 'message';
      let data = '';
      for (const line of raw.split('\n')) {
        if (line.startsWith('event: ')) event = line.slice(7);
        else if (line.startsWith('data: ')) data += line.slice(6);
      }
      yield { event, data: JSON.parse(data) };
    }
  }
}

/** One planned request over HTTP. Returns { terminals, status, latencyMs, aborted, lateTokens }. */
async function send(base, item) {
  const body = { messages: item.messages, max_tokens: item.max_tokens };
  if (item.temperature !== undefined) body.temperature = item.temperature;
  const ac = new AbortController();
  const t0 = performance.now();
  const out = { terminals: 0, status: 0, latencyMs: null, aborted: false, lateTokens: 0 };
  const cancel = item.cancel_after;
  if (cancel === 0) setTimeout(() => { out.aborted = true; ac.abort(); }, 2 + Math.floor(Math.random() * 30));
  try {
    const res = await fetch(`${base}/api/chat${item.stream ? '/stream' : ''}`, {
      method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body), signal: ac.signal,
    });
    out.status = res.status;
    if (!item.stream || res.status !== 200) {
      const reply = await res.json();
      if (res.status === 200 && typeof reply.reply === 'string') out.terminals = 1;
    } else {
      let tokens = 0;
      for await (const ev of sseEvents(res.body)) {
        if (ev.event === 'done' || ev.event === 'error') {
          out.terminals += 1;
          if (ev.event === 'error') out.status = ev.data.status ?? 500;
        } else if (out.terminals) {
          out.lateTokens += 1;
        } else if (cancel && ++tokens >= cancel) {
          out.aborted = true;
          ac.abort(); // the client goes away in the middle of the stream
          break;
        }
      }
    }
    if (out.terminals && !out.aborted) out.latencyMs = performance.now() - t0;
  } catch (err) {
    if (!out.aborted) throw err;
  }
  return out;
}

async function main() {
  const o = options();
  const worker = await startWorker({
    model: o.model, args: ['--prefix-cache-bytes', String(o.budget), ...o.workerArgs],
  });
  worker.on('stderr', (line) => { if (/error|warn/i.test(line)) process.stderr.write(`[worker] ${line}\n`); });
  const dones = { cancelled: 0 };
  worker.on('message', (m) => { if (m.type === 'done' && m.finish_reason === 'cancelled') dones.cancelled += 1; });
  const app = createApp(worker, { log: () => {}, allowClientSystem: true });
  const server = app.listen(0, '127.0.0.1');
  await new Promise((r) => server.once('listening', r));
  const base = `http://127.0.0.1:${server.address().port}`;

  const s = { garbage_sent: 0, garbage_errors: 0, cancel_sent: 0, late_tokens: 0 };
  const terminals = {};
  const errors = {};
  const latencies = [];
  let answered = 0;
  let sent = 0;
  const sample = async (idle = false) => emit({ type: 'stats', answered, idle, stats: await worker.stats() });

  const one = async (item) => {
    if (item.garbage !== undefined) {
      s.garbage_sent += 1;
      const res = await fetch(`${base}/api/chat`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: item.garbage });
      if (res.status === 400) s.garbage_errors += 1;
      await res.arrayBuffer();
      return;
    }
    const r = await send(base, item);
    answered += 1;
    if (r.aborted) s.cancel_sent += 1;
    // a client that left has its answer: the connection closed (the worker was told to cancel)
    terminals[item.id] = r.aborted ? 1 : r.terminals;
    s.late_tokens += r.lateTokens;
    if (!r.aborted && r.status !== 200) errors[r.status] = (errors[r.status] ?? 0) + 1;
    if (r.latencyMs !== null) latencies.push(r.latencyMs);
    if (answered % 500 === 0) process.stderr.write(`soak (http): ${answered} answered\n`);
  };

  const running = new Set();
  for (const item of o.plan) {
    while (running.size >= o.concurrency) await Promise.race(running);
    const p = one(item).finally(() => running.delete(p));
    running.add(p);
    if (item.garbage === undefined && ++sent % o.statsEvery === 0) await sample();
  }
  await Promise.all(running);
  for (let i = 0; i < 500 && worker.inFlight > 0; i++) await new Promise((r) => setTimeout(r, 10));
  await sample(true);
  const ready = worker.info ?? {};
  server.closeAllConnections();
  server.close();
  await worker.close();
  emit({
    type: 'summary', ...s, terminals, errors, latencies_ms: latencies, cancelled: dones.cancelled,
    worker_in_flight_end: worker.inFlight, backend: ready.backend ?? '?', worker_exit_code: 0,
  });
}

main().catch((err) => { process.stderr.write(`soak (http): ${err.stack ?? err}\n`); process.exit(1); });
