#!/usr/bin/env node
// Screenshots of the chat page answering real questions, for the README:
//   node examples/express/scripts/screenshot.js --adapter models/demo [--out FILE.png]
//        [--model BASE] [--model-id NAME] [--lang pt|en] [--question TEXT]...
// Starts the worker on the adapter (or --model alone), the Express app on a free loopback port
// and headless Chromium (testlib/browser.js), asks the questions through the page as a person
// would (typing, Enter, waiting for the answer), then writes FILE.png (desktop, 1000x760) and
// FILE-phone.png (390x844). Defaults: --out examples/express/screenshots/chat.png, two
// questions from the sample data, --lang pt.
import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { fileURLToPath } from 'node:url';
import { createWorker } from '../../../clients/node/index.js';
import { createApp } from '../app.js';
import { findChromium, launchBrowser } from '../testlib/browser.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const DEFAULT_QUESTIONS = ['Em que ano foi fundado o Sporting Clube Farense?', 'Qual é o estádio do Farense?'];

const { values } = parseArgs({
  options: {
    adapter: { type: 'string' },
    model: { type: 'string' },
    'model-id': { type: 'string' },
    out: { type: 'string', default: path.join(HERE, '..', 'screenshots', 'chat.png') },
    lang: { type: 'string', default: 'pt' },
    question: { type: 'string', multiple: true },
    help: { type: 'boolean', short: 'h' },
  },
});
if (values.help || (!values.adapter && !values.model)) {
  process.stderr.write('usage: node examples/express/scripts/screenshot.js --adapter models/NAME [--model BASE] [--out FILE.png] [--model-id NAME] [--lang pt|en] [--question TEXT]...\n');
  process.exit(values.help ? 0 : 2);
}
const chromium = findChromium();
if (!chromium.path) {
  process.stderr.write(`screenshot: ${chromium.reason}\n`);
  process.exit(2);
}

const abs = (p) => (p ? path.resolve(process.cwd(), p) : undefined);
const out = abs(values.out);
const phoneOut = out.replace(/(\.png)?$/i, '-phone.png');
const modelId = values['model-id'] ?? path.basename(abs(values.adapter ?? values.model));
const questions = values.question ?? DEFAULT_QUESTIONS;

const worker = createWorker({ adapter: abs(values.adapter), model: abs(values.model) });
worker.on('stderr', (line) => process.stderr.write(`[worker] ${line}\n`));
const server = createApp(worker, { modelId, log: () => {} }).listen(0, '127.0.0.1');
let browser;
try {
  await worker.start();
  const base = `http://127.0.0.1:${server.address().port}`;
  browser = await launchBrowser(chromium.path);
  const page = await browser.newPage();
  await page.setViewport({ width: 1000, height: 760 });
  await page.evaluateOnNewDocument((lang) => localStorage.setItem('farense-chat.lang', lang), values.lang);
  await page.goto(base, { waitUntil: 'load' });
  await page.waitForSelector('body[data-ready]');
  for (const [i, q] of questions.entries()) {
    await page.type('#input', q);
    await page.keyboard.press('Enter');
    await page.waitForFunction((n) => document.querySelectorAll('.msg.assistant').length === n
      && !document.querySelector('.msg.streaming') && document.getElementById('stop').hidden, { timeout: 120_000 }, i + 1);
    process.stdout.write(`${q}\n  -> ${await page.$eval('.msg.assistant:last-child .text', (el) => el.textContent)}\n`);
  }
  await page.evaluate(() => document.activeElement?.blur());
  mkdirSync(path.dirname(out), { recursive: true });
  await page.screenshot({ path: out });
  await page.setViewport({ width: 390, height: 844, isMobile: true, hasTouch: true });
  // (a change to isMobile reloads the page: the conversation comes back from localStorage)
  await page.waitForSelector('body[data-ready]');
  await page.evaluate(() => {
    document.activeElement?.blur();
    document.querySelector('.msg:last-child')?.scrollIntoView({ block: 'end' });
  });
  await page.screenshot({ path: phoneOut });
  process.stdout.write(`wrote ${out} and ${phoneOut}\n`);
} finally {
  await browser?.close();
  server.close();
  await worker.close();
}
