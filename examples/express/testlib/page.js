// Pieces of the chat page tests (test/page.test.js): a worker wrapper that lets a test choose the
// answers' length and hold a stream open, and the page actions a person does (type, send, wait).

/**
 * The worker as the app sees it, with two knobs for the tests: `maxTokens` (the page sends no
 * max_tokens; with WORKER_TEST_IGNORE_EOS every answer is exactly this long) and `hold(n)`
 * (the next stream pauses, between the app and the worker client, after n tokens until
 * `release()`): the browser is then sure to see a partial answer before the last event.
 * Everything else is the real client.
 */
export function steerable(worker) {
  const ctl = { maxTokens: 12, gate: null };
  ctl.hold = (after) => {
    let release;
    const open = new Promise((resolve) => { release = resolve; });
    ctl.gate = { after, open };
    ctl.release = () => { ctl.gate = null; release(); };
  };
  const stream = (request, opts) => {
    const inner = worker.stream({ ...request, max_tokens: request.max_tokens ?? ctl.maxTokens }, opts);
    const gate = ctl.gate;
    return {
      get id() { return inner.id; },
      done: inner.done,
      async* [Symbol.asyncIterator]() {
        let n = 0;
        for await (const text of inner) {
          yield text;
          if (gate && ++n === gate.after) await gate.open;
        }
      },
    };
  };
  const wrapped = new Proxy(worker, {
    get(target, prop) {
      if (prop === 'stream') return stream;
      const value = Reflect.get(target, prop, target);
      return typeof value === 'function' ? value.bind(target) : value;
    },
  });
  return { worker: wrapped, ctl };
}

/** The page's messages as the user sees them. */
export function messages(page) {
  return page.$$eval('#messages .msg', (items) => items.map((li) => ({
    role: li.classList.contains('user') ? 'user' : 'assistant',
    text: li.querySelector('.text').textContent,
    meta: li.querySelector('.meta').textContent,
  })));
}

/** Types a question and presses Enter, as a person would. */
export async function ask(page, question) {
  await page.click('#input');
  await page.$eval('#input', (el) => { el.value = ''; });
  await page.type('#input', question);
  await page.keyboard.press('Enter');
}

/** Waits until the page shows `n` answers and none is streaming (Send is back). */
export function answered(page, n, timeout = 60_000) {
  return page.waitForFunction((count) => document.querySelectorAll('#messages .msg.assistant').length === count
    && !document.querySelector('.msg.streaming') && document.getElementById('stop').hidden
    && !document.getElementById('send').hidden, { timeout }, n);
}

/** Waits until the answer being streamed shows some text (Stop is visible). */
export function partial(page, timeout = 60_000) {
  return page.waitForFunction(() => {
    const text = document.querySelector('#messages .msg.assistant.streaming .text');
    return text && text.textContent.length > 0 && !document.getElementById('stop').hidden;
  }, { timeout });
}

/** Waits until the notice (role=alert) shows text matching `re`; returns that text. */
export async function notice(page, re, timeout = 60_000) {
  await page.waitForFunction((source) => {
    const el = document.getElementById('notice');
    return !el.hidden && new RegExp(source).test(el.textContent);
  }, { timeout }, re.source);
  return page.$eval('#notice', (el) => el.textContent);
}

/** A fresh browser context (its own localStorage) and page on `url`, ready; the browser's
 * language is `acceptLanguage` (navigator.languages, which the page picks its labels from). */
export async function openPage(browser, url, { viewport = { width: 1000, height: 760 }, acceptLanguage = 'pt-PT,pt' } = {}) {
  const context = await browser.createBrowserContext();
  const page = await context.newPage();
  const cdp = await page.createCDPSession();
  await cdp.send('Network.setUserAgentOverride', { userAgent: await browser.userAgent(), acceptLanguage });
  const errors = [];
  page.on('pageerror', (err) => errors.push(err.message));
  page.on('console', (msg) => { if (msg.type() === 'error') errors.push(msg.text()); });
  await page.setViewport(viewport);
  await page.goto(url, { waitUntil: 'load' });
  await page.waitForSelector('body[data-ready]');
  return { context, page, errors };
}
