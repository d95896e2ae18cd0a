// Shared test helpers (not a test file: node --test runs files under test/ only).
// The worker-side helpers (paths, schema validation, recorders) are the Node client's.
export * from '../../../clients/node/testlib/helpers.js';
import { once } from 'node:events';

/**
 * Starts an Express app on a free loopback port: { server, base, close }, where close() drops
 * open connections and stops listening (the worker is the caller's to close).
 */
export async function listen(app) {
  const server = app.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    server,
    base: `http://127.0.0.1:${server.address().port}`,
    close() { server.closeAllConnections(); server.close(); },
  };
}

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
