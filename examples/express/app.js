// The Express app: chat endpoints in front of the worker client (clients/node).
// createApp(worker) takes a started-or-starting Worker (or Pool) so tests can listen(0).
import { createHash, timingSafeEqual } from 'node:crypto';
import express from 'express';
import { AbortError, TimeoutError, WorkerError, WorkerExitedError } from '../../clients/node/index.js';
import { LIMITS, SYSTEM_REFUSED, abortOnClose, writeWithBackpressure } from './http.js';
import { addOpenAiRoutes, openaiError } from './openai.js';
import { createMetrics } from './metrics.js';
import { addPageRoutes, securityHeaders } from './page.js';
import { clientLimits } from './limits.js';

export { LIMITS, SYSTEM_REFUSED };

const ROLES = new Set(['system', 'user', 'assistant']);

/** Default logger: one JSON object per line on stderr. */
export function defaultLog(level, msg, fields = {}) {
  process.stderr.write(`${JSON.stringify({ time: new Date().toISOString(), level, msg, ...fields })}\n`);
}

// JSON.parse accepts lone surrogates ("\ud800"); the worker refuses such a line as bad_json
// with no id, so the request would only end at its timeout (test/security.test.js).
const NOT_UNICODE = 'must be valid Unicode text (no lone surrogates)';

const isOpenAiPath = (req) => req.path.startsWith('/v1/');

const isPlainObject = (v) => v !== null && typeof v === 'object' && !Array.isArray(v);

/**
 * Validates a chat body: `{messages}` or `{message, history?}`, plus optional max_tokens and
 * temperature. Returns { request } for the worker, or { error } (a short message for a 400).
 * A `system` message is refused unless `allowSystem` (the system prompt is the server's).
 */
export function parseChatBody(body, { allowSystem = false } = {}) {
  if (!isPlainObject(body)) return { error: 'expected a JSON object body' };
  const known = new Set(['messages', 'message', 'history', 'max_tokens', 'temperature']);
  for (const k of Object.keys(body)) {
    if (!known.has(k)) return { error: `unknown field "${String(k).slice(0, 40)}"` };
  }
  const checkList = (list, name) => {
    if (!Array.isArray(list)) return `${name} must be an array`;
    if (list.length > LIMITS.maxMessages) return `${name} has more than ${LIMITS.maxMessages} entries`;
    for (let i = 0; i < list.length; i++) {
      const m = list[i];
      if (!isPlainObject(m) || Object.keys(m).some((k) => k !== 'role' && k !== 'content')) {
        return `${name}[${i}] must be an object {role, content}`;
      }
      if (!ROLES.has(m.role)) return `${name}[${i}].role must be system, user or assistant`;
      if (m.role === 'system' && !allowSystem) return SYSTEM_REFUSED;
      if (typeof m.content !== 'string') return `${name}[${i}].content must be a string`;
      if (!m.content.isWellFormed()) return `${name}[${i}].content ${NOT_UNICODE}`;
    }
    return null;
  };

  let messages;
  if (body.messages !== undefined) {
    if (body.message !== undefined || body.history !== undefined) {
      return { error: 'send either messages or message (with optional history), not both' };
    }
    const e = checkList(body.messages, 'messages');
    if (e) return { error: e };
    if (body.messages.length === 0) return { error: 'messages must not be empty' };
    messages = body.messages.map(({ role, content }) => ({ role, content }));
  } else if (body.message !== undefined) {
    if (typeof body.message !== 'string' || body.message.trim() === '') {
      return { error: 'message must be a non-empty string' };
    }
    if (!body.message.isWellFormed()) return { error: `message ${NOT_UNICODE}` };
    const history = body.history ?? [];
    const e = checkList(history, 'history');
    if (e) return { error: e };
    if (history.length + 1 > LIMITS.maxMessages) return { error: `history has more than ${LIMITS.maxMessages - 1} entries` };
    messages = [...history.map(({ role, content }) => ({ role, content })), { role: 'user', content: body.message }];
  } else {
    return { error: 'messages or message is required' };
  }

  const request = { messages };
  if (body.max_tokens !== undefined) {
    if (!Number.isInteger(body.max_tokens) || body.max_tokens < 1 || body.max_tokens > LIMITS.maxTokens) {
      return { error: `max_tokens must be an integer from 1 to ${LIMITS.maxTokens}` };
    }
    request.max_tokens = body.max_tokens;
  }
  if (body.temperature !== undefined) {
    if (typeof body.temperature !== 'number' || !(body.temperature >= 0 && body.temperature <= LIMITS.maxTemperature)) {
      return { error: `temperature must be a number from 0 to ${LIMITS.maxTemperature}` };
    }
    request.temperature = body.temperature;
  }
  return { request };
}

/**
 * Maps a client error to [status, public message, code]. Public messages never carry internals
 * (paths, stack traces, worker messages); those go to the server log. The code tells the chat
 * page which message to show (the `event: error` of the stream carries it).
 */
export function publicError(err) {
  if (err instanceof TimeoutError) return [504, 'the model took too long to answer', 'timeout'];
  if (err instanceof WorkerExitedError) return [503, 'the model is restarting, try again shortly', 'restarting'];
  if (err instanceof WorkerError) {
    switch (err.code) {
      case 'too_long': return [400, 'the conversation is too long for the model', 'too_long'];
      case 'too_large': return [413, 'request too large', 'too_large'];
      case 'invalid_request': return [400, 'invalid request', 'invalid'];
      case 'overloaded': return [503, 'the model is busy, try again shortly', 'busy'];
      default: return [500, 'internal error', 'internal'];
    }
  }
  return [500, 'internal error', 'internal'];
}

const sse = (event, data) => `${event ? `event: ${event}\n` : ''}data: ${JSON.stringify(data)}\n\n`;

/**
 * @param {import('../../clients/node/index.js').Worker | import('../../clients/node/index.js').Pool} worker
 * @param {{ timeoutMs?: number, log?: typeof defaultLog, allowClientSystem?: boolean,
 *   modelId?: string, adminToken?: string, reload?: () => Promise<any>, metrics?: boolean,
 *   trustProxy?: boolean | number | string, limits?: { perMinute?: number, concurrent?: number } | false }} [options]
 *   allowClientSystem: accept `system` messages from clients (default false: 400); modelId: the
 *   model name of the OpenAI routes and the chat page (default 'farense'); adminToken + reload:
 *   POST /admin/reload (Authorization: Bearer <token>) calls reload() (no token: the route is
 *   off); metrics: GET /metrics in Prometheus format (default true); trustProxy: Express's
 *   `trust proxy` (default false: clients are told apart by the socket's address); limits:
 *   per-client requests per minute and generations at once on the generation routes, 429 with
 *   Retry-After beyond them (limits.js; default: none, server.js sets them)
 */
export function createApp(worker, options = {}) {
  const log = options.log ?? defaultLog;
  const timeoutMs = options.timeoutMs ?? 120_000;
  const app = express();
  app.disable('x-powered-by');
  app.set('trust proxy', options.trustProxy ?? false);
  app.use(securityHeaders);
  const metrics = options.metrics === false ? null : createMetrics(worker);
  if (metrics) {
    app.use(metrics.middleware);
    app.get('/metrics', metrics.handler);
  }

  app.get('/healthz', (req, res) => {
    if (worker.ready) res.json({ ok: true });
    else res.status(503).json({ ok: false });
  });

  const json = express.json({ limit: LIMITS.body });
  const allowSystem = options.allowClientSystem ?? false;
  const modelId = options.modelId ?? 'farense';

  if (options.limits) {
    app.locals.limits = clientLimits({ ...options.limits, log });
    app.post(['/api/chat', '/api/chat/stream', '/v1/chat/completions'], app.locals.limits);
  }
  addChatRoutes(app, { worker, json, allowSystem, log, timeoutMs });

  // Every reload (admin route, SIGHUP, models/current changing: server.js) goes through here.
  app.locals.reload = options.reload && (async (why) => {
    try {
      const ready = await options.reload();
      log('info', 'worker reloaded', { why, model: ready.model, adapter: ready.adapter, pid: ready.pid });
      return ready;
    } catch (err) {
      metrics?.reloadFailed();
      log('error', 'reload failed; still serving the previous worker', { why, code: err.code, error: err.message });
      throw err;
    }
  });
  addAdminRoutes(app, { adminToken: options.adminToken, reload: app.locals.reload, log });

  addOpenAiRoutes(app, {
    worker, json, log, timeoutMs, allowSystem, abortOnClose,
    modelId,
  });
  addPageRoutes(app, { modelId });

  app.use((req, res) => {
    if (isOpenAiPath(req)) return res.status(404).json(openaiError(404, 'not found').body);
    res.status(404).json({ error: 'not found' });
  });

  // Body parser errors and anything unexpected: short JSON, details only in the log.
  // eslint-disable-next-line no-unused-vars
  app.use((err, req, res, next) => {
    let status = 500;
    let message = 'internal error';
    if (err && err.type === 'entity.too.large') { status = 413; message = 'request body too large'; }
    else if (err && err.type === 'entity.parse.failed') { status = 400; message = 'invalid JSON'; }
    else if (err && Number.isInteger(err.status) && err.status >= 400 && err.status < 500) {
      status = err.status;
      message = 'bad request';
    }
    log(status >= 500 ? 'error' : 'warn', 'request failed', { status, type: err?.type, error: err?.message, stack: status >= 500 ? err?.stack : undefined });
    if (res.headersSent) { res.destroy(); return; }
    res.status(status).json(isOpenAiPath(req) ? openaiError(status, message).body : { error: message });
  });

  return app;
}

/** Constant-time comparison of a presented token with the configured one. */
function tokenMatches(presented, expected) {
  const digest = (t) => createHash('sha256').update(String(t)).digest();
  return typeof presented === 'string' && timingSafeEqual(digest(presented), digest(expected));
}

/** POST /admin/reload: the server's reload() (same target, e.g. models/current re-read). */
function addAdminRoutes(app, { adminToken, reload, log }) {
  app.post('/admin/reload', async (req, res) => {
    if (!adminToken || !reload) return res.status(404).json({ error: 'not found' });
    const auth = req.get('authorization') ?? '';
    if (!tokenMatches(auth.startsWith('Bearer ') ? auth.slice(7) : null, adminToken)) {
      log('warn', 'admin reload refused: bad or missing token', { ip: req.socket.remoteAddress });
      return res.status(401).set('WWW-Authenticate', 'Bearer').json({ error: 'unauthorized' });
    }
    try {
      const ready = await reload('POST /admin/reload');
      res.json({ ok: true, model: ready.model, adapter: ready.adapter, pid: ready.pid });
    } catch (err) {
      res.status(500).json({ error: `reload failed: ${err.message}`.slice(0, 300) });
    }
  });
}

/** POST /api/chat (JSON) and POST /api/chat/stream (SSE): the example's own API. */
function addChatRoutes(app, { worker, json, allowSystem, log, timeoutMs }) {
  app.post('/api/chat', json, async (req, res) => {
    const { request, error } = parseChatBody(req.body, { allowSystem });
    if (error) return res.status(400).json({ error });
    const ac = abortOnClose(res);
    try {
      const done = await worker.complete(request, { signal: ac.signal, timeoutMs });
      res.json({ reply: done.text, usage: done.usage, finish_reason: done.finish_reason });
    } catch (err) {
      if (err instanceof AbortError) {
        log('info', 'client disconnected, generation cancelled', { id: err.id });
        return;
      }
      const [status, message] = publicError(err);
      log(status >= 500 ? 'error' : 'warn', 'chat request failed', { id: err.id, code: err.code, error: err.message, status });
      if (res.headersSent || res.destroyed) return;
      if (status === 503) res.set('Retry-After', '1'); // overloaded or restarting: retry shortly
      res.status(status).json({ error: message });
    }
  });

  app.post('/api/chat/stream', json, async (req, res) => {
    const { request, error } = parseChatBody(req.body, { allowSystem });
    if (error) return res.status(400).json({ error });
    const ac = abortOnClose(res);
    res.status(200).set({
      'Content-Type': 'text/event-stream; charset=utf-8',
      'Cache-Control': 'no-cache, no-transform',
      Connection: 'keep-alive',
      'X-Accel-Buffering': 'no',
    });
    res.flushHeaders();
    const stream = worker.stream(request, { signal: ac.signal, timeoutMs });
    try {
      for await (const text of stream) {
        if (!(await writeWithBackpressure(res, sse(null, { text })))) break; // client gone: break cancels
      }
      if (ac.signal.aborted || res.destroyed) {
        const done = await stream.done.catch(() => null);
        log('info', 'client disconnected, generation cancelled', { id: stream.id, finish_reason: done?.finish_reason });
        return;
      }
      const done = await stream.done;
      const timing = done.timing && { ttft_ms: done.timing.ttft_ms, tokens_per_s: done.timing.tokens_per_s };
      await writeWithBackpressure(res, sse('done', { usage: done.usage, finish_reason: done.finish_reason, timing }));
      res.end();
    } catch (err) {
      const [status, message, code] = publicError(err);
      log(status >= 500 ? 'error' : 'warn', 'chat stream failed', { id: stream.id, code: err.code, error: err.message, status });
      if (!res.destroyed && !res.writableEnded) {
        res.write(sse('error', { error: message, status, code }));
        res.end();
      }
    }
  });
}
