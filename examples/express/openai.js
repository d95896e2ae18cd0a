// OpenAI-compatible routes: POST /v1/chat/completions (JSON or SSE ending with `data: [DONE]`)
// and GET /v1/models, in front of the worker client. Only the fields that make sense here are
// accepted; anything else is a 400 with an OpenAI-style error object.
import { randomUUID } from 'node:crypto';
import { AbortError, TimeoutError, WorkerError, WorkerExitedError } from '../../clients/node/index.js';
import { LIMITS, SYSTEM_REFUSED, writeWithBackpressure } from './http.js';

const FIELDS = new Set([
  'model', 'messages', 'max_tokens', 'max_completion_tokens', 'temperature', 'top_p', 'stop',
  'seed', 'stream', 'stream_options', 'user',
]);
const ROLES = new Set(['system', 'developer', 'user', 'assistant']);
const MAX_STOP = 4;
const MAX_SEED = 2 ** 63;

/** An OpenAI-style error: { status, body: { error: { message, type, param, code } } }. */
export function openaiError(status, message, { param = null, code = null, type } = {}) {
  const kind = type ?? (status === 404 ? 'not_found_error' : status >= 500 ? 'server_error' : 'invalid_request_error');
  return { status, body: { error: { message, type: kind, param, code } } };
}

const isPlainObject = (v) => v !== null && typeof v === 'object' && !Array.isArray(v);
const bad = (param, message, code = null) => ({ error: openaiError(400, message, { param, code }) });

/** Text of an OpenAI message content: a string, or an array of {type: 'text', text} parts. */
function contentText(content, where) {
  if (typeof content === 'string') return { text: content };
  if (!Array.isArray(content)) return bad(`${where}.content`, `${where}.content must be a string or an array of text parts`);
  const parts = [];
  for (let i = 0; i < content.length; i++) {
    const p = content[i];
    if (!isPlainObject(p) || p.type !== 'text' || typeof p.text !== 'string') {
      return bad(`${where}.content[${i}]`, `${where}.content[${i}] must be {"type": "text", "text": "..."} (only text is supported)`);
    }
    parts.push(p.text);
  }
  return { text: parts.join('') };
}

function parseMessages(list, allowSystem) {
  if (!Array.isArray(list) || list.length === 0) return bad('messages', 'messages must be a non-empty array');
  if (list.length > LIMITS.maxMessages) return bad('messages', `messages has more than ${LIMITS.maxMessages} entries`);
  const out = [];
  for (let i = 0; i < list.length; i++) {
    const m = list[i];
    const where = `messages[${i}]`;
    if (!isPlainObject(m)) return bad(where, `${where} must be an object {role, content}`);
    for (const k of Object.keys(m)) {
      if (k !== 'role' && k !== 'content' && k !== 'name') return bad(`${where}.${k}`, `${where}.${String(k).slice(0, 40)} is not supported`);
    }
    if (!ROLES.has(m.role)) return bad(`${where}.role`, `${where}.role must be system, developer, user or assistant`);
    const role = m.role === 'developer' ? 'system' : m.role;
    if (role === 'system' && !allowSystem) return bad(`${where}.role`, SYSTEM_REFUSED, 'system_message_refused');
    const { text, error } = contentText(m.content, where);
    if (error) return { error };
    if (!text.isWellFormed()) return bad(`${where}.content`, `${where}.content must be valid Unicode text`);
    out.push({ role, content: text });
  }
  return { messages: out };
}

function parseMaxTokens(body) {
  const given = ['max_completion_tokens', 'max_tokens'].filter((k) => body[k] !== undefined && body[k] !== null);
  if (given.length === 2 && body.max_tokens !== body.max_completion_tokens) {
    return bad('max_completion_tokens', 'give max_completion_tokens or max_tokens, not two different values');
  }
  if (given.length === 0) return {};
  const v = body[given[0]];
  if (!Number.isInteger(v) || v < 1 || v > LIMITS.maxTokens) {
    return bad(given[0], `${given[0]} must be an integer from 1 to ${LIMITS.maxTokens}`);
  }
  return { max_tokens: v };
}

function parseSampling(body, request) {
  if (body.temperature != null) {
    if (typeof body.temperature !== 'number' || !(body.temperature >= 0 && body.temperature <= LIMITS.maxTemperature)) {
      return bad('temperature', `temperature must be a number from 0 to ${LIMITS.maxTemperature}`);
    }
    request.temperature = body.temperature;
  }
  if (body.top_p != null) {
    if (typeof body.top_p !== 'number' || !(body.top_p > 0 && body.top_p <= 1)) return bad('top_p', 'top_p must be a number in (0, 1]');
    request.top_p = body.top_p;
  }
  if (body.seed != null) {
    if (!Number.isInteger(body.seed) || Math.abs(body.seed) >= MAX_SEED) return bad('seed', 'seed must be an integer');
    request.seed = body.seed;
  }
  if (body.stop != null) {
    const stops = typeof body.stop === 'string' ? [body.stop] : body.stop;
    if (!Array.isArray(stops) || stops.length > MAX_STOP || stops.some((s) => typeof s !== 'string' || s === '' || !s.isWellFormed())) {
      return bad('stop', `stop must be a non-empty string or an array of up to ${MAX_STOP} non-empty strings`);
    }
    if (stops.length > 0) request.stop = stops;
  }
  return {};
}

function parseStreaming(body) {
  if (body.stream != null && typeof body.stream !== 'boolean') return bad('stream', 'stream must be a boolean');
  const stream = body.stream === true;
  let includeUsage = false;
  if (body.stream_options != null) {
    const o = body.stream_options;
    if (!stream) return bad('stream_options', 'stream_options is only allowed with stream: true');
    if (!isPlainObject(o) || Object.keys(o).some((k) => k !== 'include_usage') || (o.include_usage !== undefined && typeof o.include_usage !== 'boolean')) {
      return bad('stream_options', 'stream_options must be {"include_usage": boolean}');
    }
    includeUsage = o.include_usage === true;
  }
  return { stream, includeUsage };
}

/**
 * Validates a chat-completions body. Returns { request, stream, includeUsage, user } for the
 * worker, or { error: { status, body } }.
 * @param {unknown} body
 * @param {{ modelId: string, allowSystem?: boolean }} opts
 */
export function parseCompletionBody(body, { modelId, allowSystem = false }) {
  if (!isPlainObject(body)) return bad(null, 'expected a JSON object body');
  for (const k of Object.keys(body)) {
    if (!FIELDS.has(k)) return bad(String(k).slice(0, 40), `unknown or unsupported field "${String(k).slice(0, 40)}"`, 'unsupported_parameter');
  }
  if (typeof body.model !== 'string' || body.model === '') return bad('model', 'model is required (see GET /v1/models)');
  if (body.model !== modelId) {
    return { error: openaiError(404, `The model "${body.model.slice(0, 80)}" does not exist; this server serves "${modelId}"`, { param: 'model', code: 'model_not_found' }) };
  }
  if (body.user != null && (typeof body.user !== 'string' || body.user.length > 256)) return bad('user', 'user must be a string of at most 256 characters');
  const { messages, error } = parseMessages(body.messages, allowSystem);
  if (error) return { error };
  const max = parseMaxTokens(body);
  if (max.error) return max;
  const request = { messages, ...max };
  const sampling = parseSampling(body, request);
  if (sampling.error) return sampling;
  const streaming = parseStreaming(body);
  if (streaming.error) return streaming;
  return { request, ...streaming, user: body.user ?? null };
}

/** A worker-client error as an OpenAI-style error (public text only) and extra headers. */
export function openaiWorkerError(err) {
  if (err instanceof TimeoutError) return { ...openaiError(504, 'the model took too long to answer', { code: 'timeout' }) };
  if (err instanceof WorkerExitedError) return { ...openaiError(503, 'the model is restarting, try again shortly', { code: 'unavailable' }), headers: { 'Retry-After': '1' } };
  if (err instanceof WorkerError) {
    switch (err.code) {
      case 'too_long': return openaiError(400, 'the conversation is too long for the model', { param: 'messages', code: 'context_length_exceeded' });
      case 'too_large': return openaiError(413, 'request too large', { code: 'request_too_large' });
      case 'invalid_request': return openaiError(400, 'invalid request', { param: 'messages' });
      case 'overloaded': return { ...openaiError(503, 'the model is busy, try again shortly', { code: 'overloaded' }), headers: { 'Retry-After': '1' } };
      default: break;
    }
  }
  return openaiError(500, 'internal error');
}

const usageOf = (done) => ({
  prompt_tokens: done.usage.prompt_tokens,
  completion_tokens: done.usage.completion_tokens,
  total_tokens: done.usage.prompt_tokens + done.usage.completion_tokens,
  prompt_tokens_details: { cached_tokens: done.usage.cached_tokens ?? 0 },
});
// A cancelled generation never reaches a client that is still there; stop|length map as is.
const finishReason = (done) => (done.finish_reason === 'length' ? 'length' : 'stop');

/**
 * Registers the routes on `app`.
 * @param {import('express').Express} app
 * @param {{ worker: any, json: any, modelId: string, allowSystem: boolean, timeoutMs: number,
 *   log: Function, abortOnClose: Function }} ctx
 */
export function addOpenAiRoutes(app, ctx) {
  const { worker, json, modelId, log } = ctx;
  const created = Math.floor(Date.now() / 1000);

  app.get('/v1/models', (req, res) => {
    res.json({ object: 'list', data: [{ id: modelId, object: 'model', created, owned_by: 'farense' }] });
  });

  app.post('/v1/chat/completions', json, async (req, res) => {
    const parsed = parseCompletionBody(req.body, { modelId, allowSystem: ctx.allowSystem });
    if (parsed.error) return res.status(parsed.error.status).json(parsed.error.body);
    const meta = { id: `chatcmpl-${randomUUID()}`, created: Math.floor(Date.now() / 1000), model: modelId };
    const ac = ctx.abortOnClose(res);
    const opts = { signal: ac.signal, timeoutMs: ctx.timeoutMs };
    if (parsed.user) log('info', 'chat completion', { user: parsed.user.slice(0, 64), id: meta.id });
    if (parsed.stream) return streamCompletion(ctx, res, parsed, meta, opts, ac);
    try {
      const done = await worker.complete(parsed.request, opts);
      res.json({
        ...meta,
        object: 'chat.completion',
        choices: [{ index: 0, message: { role: 'assistant', content: done.text, refusal: null }, logprobs: null, finish_reason: finishReason(done) }],
        usage: usageOf(done),
      });
    } catch (err) {
      if (err instanceof AbortError) { log('info', 'client disconnected, generation cancelled', { id: err.id }); return; }
      sendError(ctx, res, err, 'chat completion failed');
    }
  });
}

function sendError(ctx, res, err, what) {
  const e = openaiWorkerError(err);
  ctx.log(e.status >= 500 ? 'error' : 'warn', what, { id: err.id, code: err.code, error: err.message, status: e.status });
  if (res.headersSent || res.destroyed) return;
  if (e.headers) res.set(e.headers);
  res.status(e.status).json(e.body);
}

const chunk = (meta, delta, finish = null, extra = {}) => `data: ${JSON.stringify({
  ...meta, object: 'chat.completion.chunk', choices: [{ index: 0, delta, logprobs: null, finish_reason: finish }], ...extra,
})}\n\n`;

async function streamCompletion(ctx, res, parsed, meta, opts, ac) {
  const stream = ctx.worker.stream(parsed.request, opts);
  let first;
  try {
    // The first token (or the error) before the 200: a request the worker refuses gets a real
    // status code, as from OpenAI.
    const it = stream[Symbol.asyncIterator]();
    first = await it.next();
    res.status(200).set({ 'Content-Type': 'text/event-stream; charset=utf-8', 'Cache-Control': 'no-cache, no-transform', 'X-Accel-Buffering': 'no' });
    res.flushHeaders();
    let ok = await writeWithBackpressure(res, chunk(meta, { role: 'assistant', content: '' }));
    for (let step = first; ok && !step.done; step = await it.next()) {
      ok = await writeWithBackpressure(res, chunk(meta, { content: step.value }));
    }
    if (!ok || ac.signal.aborted) {
      await it.return?.();
      const done = await stream.done.catch(() => null);
      ctx.log('info', 'client disconnected, generation cancelled', { id: stream.id, finish_reason: done?.finish_reason });
      return;
    }
    const done = await stream.done;
    await writeWithBackpressure(res, chunk(meta, {}, finishReason(done)));
    if (parsed.includeUsage) await writeWithBackpressure(res, `data: ${JSON.stringify({ ...meta, object: 'chat.completion.chunk', choices: [], usage: usageOf(done) })}\n\n`);
    await writeWithBackpressure(res, 'data: [DONE]\n\n');
    res.end();
  } catch (err) {
    if (err instanceof AbortError || ac.signal.aborted) { ctx.log('info', 'client disconnected, generation cancelled', { id: stream.id }); return; }
    if (!res.headersSent) { sendError(ctx, res, err, 'chat completion stream failed'); return; }
    const e = openaiWorkerError(err);
    ctx.log(e.status >= 500 ? 'error' : 'warn', 'chat completion stream failed', { id: stream.id, code: err.code, error: err.message, status: e.status });
    if (!res.destroyed && !res.writableEnded) {
      res.write(`data: ${JSON.stringify(e.body)}\n\n`);
      res.end();
    }
  }
}
