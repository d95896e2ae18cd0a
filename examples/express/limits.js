// Per-client limits on the generation routes, so one client cannot fill the worker's queue:
// requests per minute (express-rate-limit) and generations open at once (counted here: a rate
// limiter counts requests, not streams still running). Both answer 429 with Retry-After.
// Clients are told apart by req.ip: the socket's address, or with `trust proxy` (TRUST_PROXY)
// the address the proxy put in X-Forwarded-For.
import express from 'express';
import { rateLimit, ipKeyGenerator } from 'express-rate-limit';
import { openaiError } from './openai.js';

export const DEFAULT_LIMITS = Object.freeze({ perMinute: 30, concurrent: 2 });

/** The client a request counts against: its address (IPv6: its /56, as express-rate-limit does). */
export const clientKey = (req) => ipKeyGenerator(req.ip ?? req.socket.remoteAddress ?? 'unknown');

function refuse(req, res, code, message, retryAfter) {
  res.set('Retry-After', String(retryAfter));
  if (req.path.startsWith('/v1/')) {
    // OpenAI's own shape for a 429 (its SDKs wait Retry-After and retry)
    return res.status(429).json(openaiError(429, message, { code: 'rate_limit_exceeded', type: 'requests' }).body);
  }
  return res.status(429).json({ error: message, code });
}

/**
 * Reads the TRUST_PROXY setting into Express's `trust proxy` value: unset, '', '0' or 'false':
 * off (req.ip is the socket's address); a number: that many proxies in front; 'true': trust every
 * X-Forwarded-For (only when no client can reach the server without the proxy); otherwise
 * addresses, subnets or names Express knows ('loopback', 'uniquelocal', '10.0.0.0/8, ...').
 * Throws an Error naming TRUST_PROXY for a value Express would refuse.
 */
export function parseTrustProxy(value) {
  const v = String(value ?? '').trim();
  if (v === '' || v === '0' || v.toLowerCase() === 'false') return false;
  if (v.toLowerCase() === 'true') return true;
  if (/^\d+$/.test(v)) return Number(v);
  try {
    express().set('trust proxy', v); // compiles the list: an unknown name or a bad address throws
  } catch (err) {
    throw new Error(`TRUST_PROXY: ${err.message} (expected a number of proxies, true, loopback, uniquelocal, or addresses/subnets separated by commas)`, { cause: err });
  }
  return v;
}

/**
 * Middleware for the generation routes: [perMinute limiter, concurrency limiter].
 * @param {{ perMinute?: number, concurrent?: number, log?: Function }} options
 *   perMinute: requests per client per minute (0: no limit); concurrent: generations a client
 *   may have open at once (0: no limit)
 */
export function clientLimits({ perMinute = DEFAULT_LIMITS.perMinute, concurrent = DEFAULT_LIMITS.concurrent, log = () => {} } = {}) {
  const open = new Map(); // client key -> generations open
  const handlers = [];
  if (perMinute > 0) {
    handlers.push(rateLimit({
      windowMs: 60_000,
      limit: perMinute,
      standardHeaders: 'draft-8',
      legacyHeaders: false,
      keyGenerator: clientKey,
      handler(req, res) {
        const retryAfter = res.get('Retry-After') ?? '60'; // set by express-rate-limit
        log('warn', 'rate limited: requests per minute', { client: clientKey(req), path: req.path, limit: perMinute });
        refuse(req, res, 'rate_limited', `too many requests: at most ${perMinute} a minute, try again in ${retryAfter} s`, retryAfter);
      },
    }));
  }
  if (concurrent > 0) {
    handlers.push((req, res, next) => {
      const key = clientKey(req);
      const n = open.get(key) ?? 0;
      if (n >= concurrent) {
        log('warn', 'rate limited: generations open at once', { client: key, path: req.path, limit: concurrent });
        return refuse(req, res, 'too_many_streams', `at most ${concurrent} answers at once per client: wait for one to finish`, 1);
      }
      open.set(key, n + 1);
      res.once('close', () => {
        const left = (open.get(key) ?? 1) - 1;
        if (left > 0) open.set(key, left);
        else open.delete(key);
      });
      next();
    });
  }
  handlers.open = open; // client key -> generations open (app.locals.limits: tests, debugging)
  return handlers;
}
