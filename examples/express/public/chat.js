// The chat page: keeps the conversation in the browser (localStorage), sends it whole (trimmed
// to the server's limits) to POST /api/chat/stream and shows the answer as it streams. Every
// text from the user or the model is inserted as text (textContent / Text nodes), never as HTML.
import { fitToLimits, forServer, load, readEvents, save } from './conversation.js';
import { LABELS, applyLabels, pickLanguage, rememberLanguage } from './i18n.js';

const $ = (id) => document.getElementById(id);
const els = {
  list: $('messages'), empty: $('empty'), form: $('composer'), input: $('input'), send: $('send'),
  stop: $('stop'), notice: $('notice'), model: $('model-name'), lang: $('lang'), reset: $('new'),
};

const state = {
  lang: pickLanguage(localStorage, navigator.languages ?? [navigator.language]),
  messages: load(localStorage),
  limits: { maxMessages: 64, maxBodyBytes: 64 * 1024 },
  model: null,
  controller: null, // while an answer streams
  waitUntil: 0, // after a 429: no sending before this time (performance.now() ms)
  notice: null, // [key, ...args], kept so a language switch can re-render it
};
const label = (key, ...args) => {
  const l = LABELS[state.lang][key];
  return typeof l === 'function' ? l(...args) : l;
};

// Errors of the stream (the `code` of an `event: error`) and of HTTP statuses -> labels.
const CODE_LABELS = { restarting: 'restarting', busy: 'busy', timeout: 'timeout', too_long: 'tooLong', too_large: 'tooLarge' };
const STATUS_LABELS = { 400: 'refused', 413: 'tooLarge', 503: 'busy', 504: 'timeout' };

// ---------------------------------------------------------------------------- rendering

function metaText(meta) {
  if (!meta) return '';
  const num = (n, digits) => new Intl.NumberFormat(state.lang, { maximumFractionDigits: digits, minimumFractionDigits: digits }).format(n);
  const parts = [];
  if (meta.stopped) parts.push(label('stopped'));
  if (meta.ttft_ms != null) parts.push(label('firstToken', num(meta.ttft_ms / 1000, 2)));
  if (meta.tokens_per_s) parts.push(label('tokensPerSecond', num(meta.tokens_per_s, 0)));
  if (meta.dropped) parts.push(label('dropped', meta.dropped));
  return parts.join(' · ');
}

/** One message as a list item; its text is a Text node. */
function messageItem(m) {
  const li = document.createElement('li');
  li.className = `msg ${m.role}`;
  const who = document.createElement('span');
  who.className = 'who';
  who.textContent = label(m.role === 'user' ? 'you' : 'bot');
  const text = document.createElement('div');
  text.className = 'text';
  text.textContent = m.content;
  const meta = document.createElement('small');
  meta.className = 'meta';
  meta.textContent = metaText(m.meta);
  li.append(who, text, meta);
  li.message = m;
  return li;
}

function renderAll() {
  els.list.replaceChildren(...state.messages.map(messageItem));
  els.empty.hidden = state.messages.length > 0;
  els.list.lastElementChild?.scrollIntoView({ block: 'end' });
}

function append(m) {
  const li = messageItem(m);
  els.list.append(li);
  els.empty.hidden = true;
  li.scrollIntoView({ block: 'end' });
  return li;
}

function showNotice(key, ...args) {
  state.notice = key ? [key, ...args] : null;
  els.notice.hidden = !key;
  els.notice.textContent = key ? label(key, ...args) : '';
}

function applyLanguage() {
  document.documentElement.lang = state.lang;
  applyLabels(document, LABELS[state.lang]);
  document.title = label('title');
  if (state.model) els.model.textContent = state.model;
  for (const li of els.list.children) {
    li.querySelector('.who').textContent = label(li.message.role === 'user' ? 'you' : 'bot');
    li.querySelector('.meta').textContent = metaText(li.message.meta);
  }
  if (state.notice) showNotice(...state.notice);
}

function setBusy(controller) {
  state.controller = controller;
  els.send.hidden = Boolean(controller);
  els.stop.hidden = !controller;
  els.list.setAttribute('aria-busy', controller ? 'true' : 'false');
  if (controller) els.stop.focus();
  else if (document.activeElement === els.stop || document.activeElement === document.body) els.input.focus();
}

// ---------------------------------------------------------------------------- rate limits

let countdown = null;
function waitBeforeSending(seconds) {
  state.waitUntil = performance.now() + seconds * 1000;
  const tick = () => {
    const left = Math.ceil((state.waitUntil - performance.now()) / 1000);
    if (left <= 0) {
      clearInterval(countdown);
      countdown = null;
      els.send.disabled = false;
      if (state.notice?.[0] === 'rateLimited') showNotice(null);
      return;
    }
    els.send.disabled = true;
    showNotice('rateLimited', left);
  };
  clearInterval(countdown);
  countdown = setInterval(tick, 250);
  tick();
}

// ---------------------------------------------------------------------------- asking

/** What went wrong with a response that is not an event stream: [label, retryAfterSeconds]. */
async function httpError(res) {
  const body = await res.json().catch(() => ({}));
  if (res.status === 429) {
    const retry = Number.parseInt(res.headers.get('retry-after') ?? '', 10);
    if (body.code === 'too_many_streams') return ['tooManyAnswers', 0];
    return ['rateLimited', Number.isFinite(retry) && retry > 0 ? retry : 5];
  }
  return [STATUS_LABELS[res.status] ?? 'failed', 0];
}

/** Streams the answer into `answer` / `li`; resolves with { done } or { error: label }. */
async function readAnswer(res, answer, li, timing) {
  const text = li.querySelector('.text');
  let terminal = null;
  await readEvents(res.body.getReader(), (event, data) => {
    if (event === 'message' && typeof data.text === 'string') {
      timing.first ??= performance.now();
      answer.content += data.text;
      text.append(data.text); // a Text node: markup in the answer stays text
    } else if (event === 'done') {
      terminal = { done: data };
    } else if (event === 'error') {
      terminal = { error: CODE_LABELS[data.code] ?? STATUS_LABELS[data.status] ?? 'failed' };
    }
  });
  return terminal ?? { error: 'connectionLost' }; // the stream ended without its last event
}

async function ask(question) {
  const fitted = fitToLimits(forServer([...state.messages, { role: 'user', content: question }]), state.limits);
  if (fitted.error) return showNotice('tooLarge');
  showNotice(null);
  const user = { role: 'user', content: question };
  const answer = { role: 'assistant', content: '', meta: fitted.dropped ? { dropped: fitted.dropped } : {} };
  state.messages.push(user, answer);
  const items = [append(user), append(answer)];
  items[1].classList.add('streaming');
  els.input.value = '';
  const controller = new AbortController();
  setBusy(controller);
  const timing = { start: performance.now(), first: null }; // performance.now() ms
  let outcome;
  try {
    const res = await fetch('/api/chat/stream', {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ messages: fitted.messages }),
      signal: controller.signal,
    });
    if (res.ok && (res.headers.get('content-type') ?? '').startsWith('text/event-stream')) {
      outcome = await readAnswer(res, answer, items[1], timing);
    } else {
      const [error, retryAfter] = await httpError(res);
      outcome = { error, retryAfter };
    }
  } catch {
    outcome = controller.signal.aborted ? { stopped: true } : { error: 'connectionLost' };
  }
  items[1].classList.remove('streaming');
  finish(outcome, { question, user, answer, items, timing });
  setBusy(null);
}

function finish(outcome, { question, user, answer, items, timing }) {
  if (!state.messages.includes(user)) return; // "new conversation" was pressed meanwhile
  if (outcome.done) {
    // time to first token as this browser saw it; the decoding rate as the worker measured it
    // (tokens arrive in batches here, so counting them would say more about the network)
    answer.meta.ttft_ms = timing.first == null ? null : timing.first - timing.start;
    answer.meta.tokens_per_s = outcome.done.timing?.tokens_per_s ?? 0;
  } else if (outcome.stopped && answer.content) {
    answer.meta.stopped = true;
    if (timing.first != null) answer.meta.ttft_ms = timing.first - timing.start;
  } else {
    // Nothing to keep: the question goes back into the box, the conversation as it was.
    state.messages.splice(state.messages.indexOf(user), 2);
    for (const li of items) li.remove();
    els.empty.hidden = state.messages.length > 0;
    if (!els.input.value) els.input.value = question;
    if (outcome.retryAfter) waitBeforeSending(outcome.retryAfter);
    else if (outcome.error) showNotice(outcome.error);
    return;
  }
  items[1].querySelector('.meta').textContent = metaText(answer.meta);
  if (!save(localStorage, state.messages)) showNotice('storageFull');
}

// ---------------------------------------------------------------------------- wiring

els.form.addEventListener('submit', (ev) => {
  ev.preventDefault();
  const question = els.input.value.trim();
  if (!question || state.controller || performance.now() < state.waitUntil) return;
  ask(question);
});
els.input.addEventListener('keydown', (ev) => {
  if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    els.form.requestSubmit();
  }
});
els.stop.addEventListener('click', () => state.controller?.abort());
els.reset.addEventListener('click', () => {
  state.controller?.abort();
  state.messages = [];
  save(localStorage, state.messages);
  showNotice(null);
  renderAll();
  els.input.focus();
});
els.lang.addEventListener('click', () => {
  state.lang = state.lang === 'pt' ? 'en' : 'pt';
  rememberLanguage(localStorage, state.lang);
  applyLanguage();
});
window.addEventListener('storage', (ev) => {
  // another tab changed the conversation: show it (unless this one is answering)
  if (ev.key && ev.key.startsWith('farense-chat.conversation') && !state.controller) {
    state.messages = load(localStorage);
    renderAll();
  }
});

async function loadInfo() {
  try {
    const res = await fetch('/api/info');
    const info = await res.json();
    state.model = String(info.model);
    els.model.textContent = state.model;
    els.model.removeAttribute('data-i18n');
    state.limits = { maxMessages: info.limits.max_messages, maxBodyBytes: info.limits.max_body_bytes };
  } catch { /* keep the defaults; the model name stays "loading" */ }
}

applyLanguage();
renderAll();
loadInfo().finally(() => document.body.setAttribute('data-ready', 'true'));
els.input.focus();
