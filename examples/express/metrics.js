// Prometheus metrics (prom-client) for the app: HTTP requests and errors by route and code,
// latency, time to first token, tokens generated, requests in flight and queued, worker
// restarts and reloads, the worker's memory (resident, mlx's) and its prefix cache (the bytes
// its entries hold, the budget, entries). Served by GET /metrics. Gauges read from the
// workers' `stats` (one round trip per scrape) are summed over a Pool's workers.
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
  /** A gauge summing one number of every worker's stats (0 when a worker does not report it). */
  const statsGauge = (name, help, pick) => new client.Gauge({
    name, help, ...reg,
    async collect() { this.set((await stats()).reduce((n, s) => n + (pick(s) ?? 0), 0)); },
  });
  statsGauge('worker_resident_memory_bytes',
    'memory the worker process(es) hold: the RSS on the CPU backend, RSS + mlx buffers on Metal/CUDA (stats.memory.resident_bytes)',
    (s) => s.memory?.resident_bytes ?? s.memory?.rss_bytes);
  statsGauge('worker_rss_bytes', 'resident set size of the worker process(es)', (s) => s.memory?.rss_bytes);
  statsGauge('worker_mlx_active_memory_bytes', 'bytes of the arrays mlx holds alive in the worker(s)', (s) => s.memory?.active_bytes);
  statsGauge('worker_mlx_cache_memory_bytes', 'freed buffers mlx keeps for reuse in the worker(s)', (s) => s.memory?.cache_bytes);
  statsGauge('worker_prefix_cache_bytes', 'bytes the prefix cache entries hold (arrays as allocated + bookkeeping)', (s) => s.prefix_cache?.bytes);
  statsGauge('worker_prefix_cache_budget_bytes', 'the prefix cache byte budget (--prefix-cache-bytes)', (s) => s.prefix_cache?.budget_bytes);
  statsGauge('worker_prefix_cache_entries', 'entries in the prefix cache', (s) => s.prefix_cache?.entries);

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
