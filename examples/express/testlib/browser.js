// Headless Chromium for the page tests and scripts/screenshot.js: puppeteer-core (no browser
// download) driving the system's Chromium (Debian's `chromium`, which `make test` installs where
// apt exists and it runs as root) or Chrome. CHROMIUM=/path/to/browser chooses one.
import { accessSync, constants } from 'node:fs';
import path from 'node:path';

const NAMES = ['chromium', 'chromium-browser', 'google-chrome-stable', 'google-chrome', 'chrome'];
const MAC_APPS = [
  '/Applications/Chromium.app/Contents/MacOS/Chromium',
  '/Applications/Google Chrome.app/Contents/MacOS/Google Chrome',
];

const executable = (p) => {
  try {
    accessSync(p, constants.X_OK);
    return true;
  } catch {
    return false;
  }
};

/** { path } of a Chromium/Chrome to drive, or { reason } why there is none. */
export function findChromium(env = process.env) {
  if (env.CHROMIUM) {
    return executable(env.CHROMIUM) ? { path: env.CHROMIUM } : { reason: `CHROMIUM=${env.CHROMIUM} is not an executable file` };
  }
  const dirs = (env.PATH ?? '').split(path.delimiter).filter(Boolean);
  for (const name of NAMES) {
    for (const dir of dirs) {
      const p = path.join(dir, name);
      if (executable(p)) return { path: p };
    }
  }
  for (const p of MAC_APPS) if (executable(p)) return { path: p };
  return {
    reason: `no Chromium or Chrome found (looked for ${NAMES.join(', ')} on PATH and in /Applications): `
      + '`make test` installs Debian\'s chromium where apt-get exists and it runs as root; elsewhere install one or set CHROMIUM=/path/to/it',
  };
}

/** Launches it headless; the caller closes it. */
export async function launchBrowser(chromiumPath) {
  const { default: puppeteer } = await import('puppeteer-core');
  return puppeteer.launch({
    executablePath: chromiumPath,
    headless: true,
    // --no-sandbox: Chromium refuses to start its sandbox as root (CI runs as root); the pages
    // are our own, on loopback
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--no-first-run'],
  });
}
