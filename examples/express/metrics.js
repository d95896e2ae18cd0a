// Prometheus metrics (prom-client) for the app: HTTP requests and errors by route and code,
// latency, time to first token, tokens generated, requests in flight and queued, worker
// restarts and reloads, the worker's resident memory. Served by GET /metrics.
import client from 'prom-client';

const LATENCY_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120];
const TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30];

/** Worker or Pool stats as one list (a Pool answers an array). */
async function workerStats(worker) {
  try {
    const s = await worker.stats({ timeoutMs: 2_000 });
    return Array.isArray(s) ? s : [s];
  } catch {
    return []; // not ready (starting, restarting): the gauges read 0
  }
}

/**
 * @param {any} worker a Worker or a Pool (its 'message', 'restart' and 'reload' events are counted)
 * @returns {{ registry: client.Registry, middleware: Function, handler: Function, reloadFailed: Function }}
 */
export function createMetrics(worker) {
  const registry = new client.Registry();
  client.collectDefaultMetrics({ register: registry });
  const reg = { registers: [registry] };
  const requests = new client.Counter({ name: 'http_requests_total', help: 'HTTP requests by route and status code', labelNames: ['route', 'code'], ...reg });
  const errors = new client.Counter({ name: 'http_request_errors_total', help: 'HTTP responses with status >= 400, by route and code', labelNames: ['route', 'code'], ...reg });
  const latency = new client.Histogram({ name: 'http_request_duration_seconds', help: 'time from request to the end of the response', labelNames: ['route'], buckets: LATENCY_BUCKETS, ...reg });
  const ttft = new client.Histogram({ name: 'generation_time_to_first_token_seconds', help: 'worker: request line read to first token', buckets: TTFT_BUCKETS, ...reg });
  const tokens = new client.Counter({ name: 'generation_tokens_total', help: 'tokens generated (done.usage.completion_tokens)', ...reg });
  const restarts = new client.Counter({ name: 'worker_restarts_total', help: 'worker processes restarted after a crash', ...reg });
  const reloads = new client.Counter({ name: 'worker_reloads_total', help: 'adapter/model reloads by result', labelNames: ['result'], ...reg });
  new client.Gauge({
    name: 'generation_requests_in_flight', help: 'requests the worker(s) owe an answer (client side)', ...reg,
    collect() { this.set(worker.inFlight ?? 0); },
  });
  let pending = null; // one stats round trip per scrape, shared by the gauges below
  const stats = () => { pending ??= workerStats(worker).finally(() => setTimeout(() => { pending = null; }, 0)); return pending; };
  new client.Gauge({
    name: 'worker_queued_requests', help: 'requests accepted by the worker(s), waiting for a batch slot', ...reg,
    async collect() { this.set((await stats()).reduce((n, s) => n + s.queued, 0)); },
  });
  new client.Gauge({
    name: 'worker_resident_memory_bytes', help: 'resident memory of the worker process(es)', ...reg,
    async collect() { this.set((await stats()).reduce((n, s) => n + (s.memory?.rss_bytes ?? 0), 0)); },
  });

  const on = (event, fn) => { if (typeof worker.on === 'function') worker.on(event, fn); }; // stubs in tests
  on('message', (msg) => {
    if (msg.type !== 'done') return;
    tokens.inc(msg.usage.completion_tokens);
    if (msg.timing.ttft_ms != null) ttft.observe(msg.timing.ttft_ms / 1000);
  });
  on('restart', () => restarts.inc());
  on('reload', () => reloads.inc({ result: 'ok' }));

  /** Express middleware: counts every response once it is finished (or the client left). */
  const middleware = (req, res, next) => {
    const end = latency.startTimer();
    res.once('close', () => {
      const route = req.route?.path ?? 'unmatched';
      const code = String(res.statusCode);
      requests.inc({ route, code });
      if (res.statusCode >= 400) errors.inc({ route, code });
      end({ route });
    });
    next();
  };
  const handler = async (req, res) => {
    res.set('Content-Type', registry.contentType);
    res.end(await registry.metrics());
  };
  return { registry, middleware, handler, reloadFailed: () => reloads.inc({ result: 'failed' }) };
}
