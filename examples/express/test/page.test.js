// The chat page (public/) in headless Chromium, against the real Express app and the real worker
// on models/tiny-mistral: streaming, two turns, the conversation kept across a reload, markup
// from the user and from the model shown as text, Stop, a worker restart, a dropped connection,
// a full queue, the rate limit's wait, trimming to the server's limits, a phone's width.
// Skipped, with the reason, where no Chromium is installed (testlib/browser.js).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { createWorker } from '../../../clients/node/index.js';
import { createApp } from '../app.js';
import { PYTHON, MODEL, TEST_ENV, TEST_ARGS, protocolRecorder, assertNoInternals, listen } from '../testlib/helpers.js';
import { findChromium, launchBrowser } from '../testlib/browser.js';
import { steerable, messages, ask, answered, partial, notice, openPage } from '../testlib/page.js';

const chromium = findChromium();
const skip = chromium.path ? false : chromium.reason;
const MODEL_ID = 'farense-test';
const ECHO = 'ECHO-TEST';

const rec = protocolRecorder();
let worker;
let ctl;
let http;
let browser;

before(async () => {
  if (skip) return;
  worker = createWorker({
    python: PYTHON, model: MODEL, args: TEST_ARGS, onMessage: rec.onMessage,
    env: { ...TEST_ENV, WORKER_TEST_ECHO: ECHO },
  });
  rec.attachSend(worker);
  const steer = steerable(worker);
  ctl = steer.ctl;
  http = await listen(createApp(steer.worker, { log: () => {}, modelId: MODEL_ID, metrics: false }));
  [browser] = await Promise.all([launchBrowser(chromium.path), worker.start()]);
});

after(async () => {
  await browser?.close();
  http?.close();
  await worker?.close();
  assert.deepEqual(rec.invalid, [], 'every message matches docs/protocol.schema.json');
});

/** The last generation request the worker got, and its terminal message. */
const lastSent = () => rec.sent.filter((m) => m.id && !m.op).at(-1);
const doneOf = (id) => rec.waitFor((m) => m.type === 'done' && m.id === id, 30_000);
const pageErrors = (errors) => errors.filter((e) => !/Failed to load resource/.test(e));

test('two turns stream token by token, are sent whole, survive a reload; "new conversation" clears', { skip }, async () => {
  const { context, page, errors } = await openPage(browser, http.base);
  try {
    assert.equal(await page.$eval('#model-name', (el) => el.textContent), MODEL_ID);
    assert.equal(await page.$eval('#messages', (el) => el.getAttribute('role')), 'log');
    assert.equal(await page.$eval('#messages', (el) => el.getAttribute('aria-live')), 'polite');

    ctl.maxTokens = 40;
    ctl.hold(3);
    await ask(page, 'Quem fundou o Farense?');
    await partial(page); // some tokens on screen while the answer is still streaming
    const early = (await messages(page)).at(-1).text;
    assert.equal(await page.$eval('#messages', (el) => el.getAttribute('aria-busy')), 'true');
    ctl.release();
    await answered(page, 1);
    const first = lastSent();
    const done1 = await doneOf(first.id);
    let shown = await messages(page);
    assert.equal(shown.length, 2);
    assert.deepEqual(shown[0], { role: 'user', text: 'Quem fundou o Farense?', meta: '' });
    assert.equal(shown[1].text, done1.text, 'the answer on screen is the worker\'s');
    assert.ok(early.length > 0 && early.length < done1.text.length, `partial "${early}" before "${done1.text}"`);
    assert.match(shown[1].meta, /^1\.º token em \d+,\d\d s · \d+ tokens\/s$/);
    assert.equal(await page.$eval('#messages', (el) => el.getAttribute('aria-busy')), 'false');

    await ask(page, 'E qual é o estádio?');
    await answered(page, 2);
    const second = lastSent();
    assert.deepEqual(second.messages, [
      { role: 'user', content: 'Quem fundou o Farense?' },
      { role: 'assistant', content: done1.text },
      { role: 'user', content: 'E qual é o estádio?' },
    ], 'the whole conversation is sent');
    const done2 = await doneOf(second.id);
    shown = await messages(page);
    assert.equal(shown.length, 4);
    assert.equal(shown[3].text, done2.text);

    await page.reload({ waitUntil: 'load' });
    await page.waitForSelector('body[data-ready]');
    assert.deepEqual((await messages(page)).map((m) => m.text), shown.map((m) => m.text), 'kept across a reload');

    await page.click('#lang'); // English labels, kept across a reload too
    assert.equal(await page.$eval('#send', (el) => el.textContent), 'Send');
    assert.equal(await page.$eval('#input', (el) => el.placeholder), 'Type your question…');
    assert.match((await messages(page))[1].meta, /^first token in \d+\.\d\d s · \d+ tokens\/s$/);
    await page.reload({ waitUntil: 'load' });
    await page.waitForSelector('body[data-ready]');
    assert.equal(await page.$eval('html', (el) => el.lang), 'en');
    assert.equal(await page.$eval('#new', (el) => el.textContent), 'New conversation');

    await page.click('#new');
    assert.deepEqual(await messages(page), []);
    await page.reload({ waitUntil: 'load' });
    await page.waitForSelector('body[data-ready]');
    assert.deepEqual(await messages(page), []);
    assert.deepEqual(pageErrors(errors), []);
  } finally {
    await context.close();
  }
});

test('markup and control strings from the user and from the model are shown as text', { skip }, async () => {
  const { context, page, errors } = await openPage(browser, http.base);
  try {
    // WORKER_TEST_ECHO: the model answers with the question, token by token
    const question = `${ECHO} <img src=x onerror="window.__pwned=1"> [INST] <script>window.__pwned=2</script> </s> <b>negrito</b> &amp;`;
    ctl.maxTokens = 200;
    await ask(page, question);
    await answered(page, 1);
    const sent = lastSent();
    assert.equal(sent.messages.at(-1).content, question, 'the worker got the question as plain text');
    const done = await doneOf(sent.id);
    assert.ok(done.text.startsWith(question), `the model wrote the markup: ${done.text.slice(0, 120)}`);
    const check = async () => {
      const shown = await messages(page);
      assert.equal(shown[0].text, question);
      assert.equal(shown[1].text, done.text);
      assert.equal(await page.$$eval('#messages img, #messages script, #messages b', (els) => els.length), 0, 'no element was made from the text');
      assert.equal(await page.evaluate(() => window.__pwned), undefined, 'no script ran');
    };
    await check();
    await page.reload({ waitUntil: 'load' }); // and when rendered again from localStorage
    await page.waitForSelector('body[data-ready]');
    await check();
    assert.deepEqual(pageErrors(errors), []);
  } finally {
    await context.close();
  }
});

test('Stop cancels the generation in the worker mid-stream; the next question works', { skip }, async () => {
  const { context, page } = await openPage(browser, http.base);
  try {
    ctl.maxTokens = 2000; // with WORKER_TEST_IGNORE_EOS: far longer than the test needs to press Stop
    await ask(page, 'Conta a história do Farense.');
    await partial(page);
    const { id } = lastSent();
    await page.click('#stop');
    await answered(page, 1);
    const done = await doneOf(id);
    assert.equal(done.finish_reason, 'cancelled');
    assert.ok(done.usage.completion_tokens < 2000);
    assert.ok(rec.sent.some((m) => m.op === 'cancel' && m.id === id), 'the worker was told to cancel');
    const shown = await messages(page);
    assert.ok(shown[1].text.length > 0, 'the partial answer stays');
    assert.match(shown[1].meta, /^interrompida/);

    ctl.maxTokens = 12;
    await ask(page, 'Onde joga o Farense?');
    await answered(page, 2);
    const next = await doneOf(lastSent().id);
    assert.equal(next.finish_reason, 'length');
    assert.equal((await messages(page))[3].text, next.text);
  } finally {
    await context.close();
  }
});

test('a worker killed mid-answer: the page says the model is restarting, then works again', { skip }, async () => {
  const { context, page } = await openPage(browser, http.base);
  try {
    ctl.maxTokens = 2000;
    await ask(page, 'Quem é o presidente?');
    await partial(page);
    const ready = once(worker, 'ready');
    process.kill(worker.pid, 'SIGKILL');
    const text = await notice(page, /reiniciar/);
    assert.equal(text, 'O modelo está a reiniciar. Tente de novo dentro de momentos.');
    assertNoInternals(assert, text);
    await answered(page, 0);
    assert.equal(await page.$eval('#input', (el) => el.value), 'Quem é o presidente?', 'the question is back in the box');
    await ready;

    ctl.maxTokens = 12;
    await page.click('#send');
    await answered(page, 1);
    assert.equal(await page.$eval('#notice', (el) => el.hidden), true);
    const done = await doneOf(lastSent().id);
    assert.equal((await messages(page))[1].text, done.text);
  } finally {
    await context.close();
  }
});

test('a dropped connection is reported and the next question works', { skip }, async () => {
  const { context, page } = await openPage(browser, http.base);
  try {
    ctl.maxTokens = 40;
    ctl.hold(2);
    await ask(page, 'Qual é o estádio?');
    await partial(page);
    http.server.closeAllConnections(); // the network goes away mid-answer
    await notice(page, /ligação ao servidor caiu/);
    ctl.release();
    await answered(page, 0);
    await page.click('#send');
    await answered(page, 1);
    assert.equal(await page.$eval('#notice', (el) => el.hidden), true);
  } finally {
    await context.close();
  }
});

test('a full worker queue: the stream\'s error event is shown as "busy"', { skip }, async () => {
  // A second worker with one batch slot and one queue place: two long generations fill it.
  const small = createWorker({ python: PYTHON, model: MODEL, env: TEST_ENV, args: [...TEST_ARGS, '--max-batch', '1', '--max-queue', '1'] });
  const busyHttp = await listen(createApp(small, { log: () => {}, modelId: MODEL_ID, metrics: false }));
  const ac = new AbortController();
  const { context, page } = await openPage(browser, busyHttp.base);
  try {
    await small.start();
    const long = () => small.stream({ prompt: 'x', max_tokens: 2000 }, { signal: ac.signal });
    const running = long();
    const iter = running[Symbol.asyncIterator]();
    await iter.next(); // generating
    const queued = long();
    queued.done.catch(() => {});
    const stats = await small.stats(); // answered after the worker read the second request
    assert.deepEqual([stats.in_flight, stats.queued], [1, 1], 'the batch and the queue are full');
    await ask(page, 'Olá?');
    const text = await notice(page, /ocupado/);
    assert.equal(text, 'O modelo está ocupado. Tente de novo dentro de momentos.');
    await answered(page, 0);
  } finally {
    ac.abort();
    await context.close();
    busyHttp.close();
    await small.close();
  }
});

test('over the rate limit: the page shows the wait from Retry-After and keeps the question', { skip }, async () => {
  const limits = { perMinute: 2, concurrent: 1 };
  const limited = await listen(createApp(steerable(worker).worker, { log: () => {}, modelId: MODEL_ID, metrics: false, limits }));
  const { context, page } = await openPage(browser, limited.base);
  try {
    const statuses = [];
    page.on('response', (r) => { if (r.url().endsWith('/api/chat/stream')) statuses.push([r.status(), r.headers()['retry-after']]); });
    for (const [i, q] of ['Um?', 'Dois?'].entries()) {
      await ask(page, q);
      await answered(page, i + 1);
    }
    await ask(page, 'Três?');
    const text = await notice(page, /Demasiados pedidos/);
    const [status, retryAfter] = statuses.at(-1);
    assert.equal(status, 429);
    const seconds = Number(retryAfter);
    assert.ok(seconds >= 1 && seconds <= 60, `Retry-After: ${retryAfter}`);
    const shownSeconds = Number(/dentro de (\d+) s/.exec(text)[1]);
    assert.ok(shownSeconds >= 1 && shownSeconds <= seconds, `${text} (Retry-After ${seconds})`);
    assert.equal(await page.$eval('#send', (el) => el.disabled), true, 'Send waits');
    assert.equal(await page.$eval('#input', (el) => el.value), 'Três?');
    assert.equal((await messages(page)).length, 4);
  } finally {
    await context.close();
    limited.close();
  }
});

test('a long stored conversation is trimmed to the server\'s limits before it is sent', { skip }, async () => {
  const { context, page } = await openPage(browser, http.base);
  try {
    // 80 messages of ~1.5 kB: over both limits (64 messages, 64 kB)
    const stored = Array.from({ length: 80 }, (_, i) => ({
      role: i % 2 ? 'assistant' : 'user',
      content: `${i}: ${'Farense São Luís '.repeat(90)}`,
    }));
    await page.evaluate((m) => localStorage.setItem('farense-chat.conversation.v1', JSON.stringify({ messages: m })), stored);
    await page.reload({ waitUntil: 'load' });
    await page.waitForSelector('body[data-ready]');
    assert.equal((await messages(page)).length, 80);
    ctl.maxTokens = 8;
    await ask(page, 'E agora?');
    await answered(page, 41);
    const sent = lastSent();
    const body = Buffer.byteLength(JSON.stringify({ messages: sent.messages }));
    assert.ok(sent.messages.length <= 64 && body <= 64 * 1024, `${sent.messages.length} messages, ${body} bytes`);
    assert.equal(sent.messages[0].role, 'user');
    assert.deepEqual(sent.messages.at(-1), { role: 'user', content: 'E agora?' });
    assert.deepEqual(sent.messages.slice(0, -1), stored.slice(80 - (sent.messages.length - 1)), 'the most recent turns, whole');
    const dropped = 80 - (sent.messages.length - 1);
    assert.match((await messages(page)).at(-1).meta, new RegExp(`${dropped} mensagens antigas não foram enviadas`));
  } finally {
    await context.close();
  }
});

test('a phone\'s width: nothing overflows sideways, the controls stay on screen', { skip }, async () => {
  const { context, page } = await openPage(browser, http.base, { viewport: { width: 360, height: 740, isMobile: true, hasTouch: true } });
  try {
    ctl.maxTokens = 60;
    await ask(page, `${ECHO} ${'x'.repeat(120)} https://example.invalid/${'a'.repeat(80)}`);
    await answered(page, 1);
    const box = await page.evaluate(() => {
      const rect = (id) => document.getElementById(id).getBoundingClientRect().toJSON();
      return { scroll: document.documentElement.scrollWidth, width: window.innerWidth, send: rect('send'), input: rect('input'), lang: rect('lang'), reset: rect('new') };
    });
    assert.ok(box.scroll <= box.width, `page ${box.scroll} px wide in a ${box.width} px screen`);
    for (const name of ['send', 'input', 'lang', 'reset']) {
      assert.ok(box[name].left >= 0 && box[name].right <= box.width && box[name].bottom <= 740, `${name} on screen: ${JSON.stringify(box[name])}`);
    }
  } finally {
    await context.close();
  }
});

test('the page\'s Content-Security-Policy blocks inline script in the browser', { skip }, async () => {
  const { context, page } = await openPage(browser, http.base);
  try {
    const violations = await page.evaluate(() => new Promise((resolve) => {
      const seen = [];
      document.addEventListener('securitypolicyviolation', (e) => {
        seen.push(e.effectiveDirective);
        if (seen.length === 2) resolve(seen.sort());
      });
      const s = document.createElement('script');
      s.textContent = 'window.__inline = 1';
      document.body.append(s);
      document.body.insertAdjacentHTML('beforeend', '<button id="probe" onclick="window.__inline = 2">x</button>');
      document.getElementById('probe').click();
    }));
    assert.deepEqual(violations, ['script-src-attr', 'script-src-elem']);
    assert.equal(await page.evaluate(() => window.__inline), undefined);
  } finally {
    await context.close();
  }
});
