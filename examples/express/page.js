// The chat page (public/: plain HTML, CSS and ES modules, no build step) and what it needs:
// security headers on every response, GET /api/info (the model's public name and the limits the
// page trims the conversation to).
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import express from 'express';
import { LIMITS } from './http.js';

export const PUBLIC_DIR = path.join(path.dirname(fileURLToPath(import.meta.url)), 'public');

/** The page loads its own scripts, styles and images only; no inline script or style, no frames. */
export const CONTENT_SECURITY_POLICY = [
  "default-src 'none'",
  "script-src 'self'",
  "style-src 'self'",
  "img-src 'self'",
  "connect-src 'self'",
  "base-uri 'none'",
  "form-action 'self'",
  "frame-ancestors 'none'",
].join('; ');

const SECURITY_HEADERS = {
  'Content-Security-Policy': CONTENT_SECURITY_POLICY,
  'X-Content-Type-Options': 'nosniff',
  'X-Frame-Options': 'DENY',
  'Referrer-Policy': 'no-referrer',
  'Cross-Origin-Opener-Policy': 'same-origin',
  'Cross-Origin-Resource-Policy': 'same-origin',
  'Permissions-Policy': 'camera=(), microphone=(), geolocation=(), payment=()',
};

/** express's '64kb' as a number of bytes (the page compares its JSON body with it). */
function bytes(limit) {
  const m = /^(\d+)(kb|mb)?$/i.exec(limit);
  return Number(m[1]) * ({ kb: 1024, mb: 1024 * 1024 }[m[2]?.toLowerCase()] ?? 1);
}

/** Security headers on every response (JSON and event streams too). */
export function securityHeaders(req, res, next) {
  res.set(SECURITY_HEADERS);
  next();
}

/**
 * GET /api/info and the static files of public/. The files are revalidated on every load
 * (Cache-Control: no-cache + ETag/Last-Modified: a 304 when unchanged), so an updated page
 * never runs with a stale script.
 */
export function addPageRoutes(app, { modelId }) {
  app.get('/api/info', (req, res) => {
    res.set('Cache-Control', 'no-cache');
    res.json({ model: modelId, limits: { max_messages: LIMITS.maxMessages, max_body_bytes: bytes(LIMITS.body) } });
  });
  app.use(express.static(PUBLIC_DIR, {
    index: 'index.html',
    dotfiles: 'ignore',
    redirect: false,
    setHeaders(res) { res.set('Cache-Control', 'no-cache'); },
  }));
}
