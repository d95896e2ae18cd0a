// The conversation as the page keeps it: stored in localStorage, trimmed to the server's limits
// before it is sent. Pure functions (no DOM): test/conversation.test.js runs them under Node.

export const STORAGE_KEY = 'farense-chat.conversation.v1';

const ROLES = new Set(['user', 'assistant']);
const encoder = new TextEncoder();

/** Bytes of the JSON body the page sends for these messages (what the server's limit counts). */
export function bodyBytes(messages) {
  return encoder.encode(JSON.stringify({ messages })).length;
}

/**
 * The most recent part of `messages` that the server accepts: at most `maxMessages` entries and
 * a body of at most `maxBodyBytes`, starting with a user message (roles must alternate).
 * Returns { messages, dropped } or { error: 'too_large' } when even the last message alone is
 * over the limit.
 */
export function fitToLimits(messages, { maxMessages, maxBodyBytes }) {
  let start = Math.max(0, messages.length - maxMessages);
  const fits = (from) => bodyBytes(messages.slice(from)) <= maxBodyBytes;
  while (start < messages.length && (messages[start].role !== 'user' || !fits(start))) start++;
  if (start >= messages.length) return { error: 'too_large' };
  return { messages: messages.slice(start), dropped: start };
}

/** A stored conversation, or [] when there is none or it is not what this page wrote. */
export function load(storage) {
  try {
    const saved = JSON.parse(storage.getItem(STORAGE_KEY) ?? 'null');
    if (!Array.isArray(saved?.messages)) return [];
    return saved.messages.filter((m) => m && ROLES.has(m.role) && typeof m.content === 'string')
      .map(({ role, content, meta }) => ({ role, content, ...(typeof meta === 'object' && meta ? { meta } : {}) }));
  } catch {
    return [];
  }
}

/** Stores the conversation; false when the browser refuses (storage full or disabled). */
export function save(storage, messages) {
  try {
    storage.setItem(STORAGE_KEY, JSON.stringify({ messages }));
    return true;
  } catch {
    return false;
  }
}

/** The messages as the server wants them: role and content only. */
export function forServer(messages) {
  return messages.map(({ role, content }) => ({ role, content }));
}

/**
 * Reads a Server-Sent Events stream (a fetch body reader) and calls onEvent(event, data) for each
 * event, data parsed as JSON. Resolves when the stream ends.
 */
export async function readEvents(reader, onEvent) {
  const decoder = new TextDecoder();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
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
      if (data) onEvent(event, JSON.parse(data));
    }
  }
}
