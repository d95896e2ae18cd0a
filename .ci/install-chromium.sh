#!/usr/bin/env bash
# Chromium for the chat page's browser tests (examples/express/test/page.test.js): Debian's
# `chromium`, installed with apt-get where it exists and we are root (CI, a fresh Linux machine).
# Elsewhere (a Mac, no root) it says why not, and those tests are skipped with the same reason.
# CHROMIUM=/path/to/browser uses that one instead.
set -u
if [ -n "${CHROMIUM:-}" ]; then exit 0; fi
for name in chromium chromium-browser google-chrome-stable google-chrome; do
  command -v "$name" >/dev/null 2>&1 && exit 0
done
for app in "/Applications/Chromium.app/Contents/MacOS/Chromium" "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome"; do
  [ -x "$app" ] && exit 0
done
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "browser: installing chromium (apt-get) for the chat page's browser tests"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null 2>&1; then
    apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null \
      || { echo "browser: apt-get install chromium failed" >&2; exit 1; }
  fi
  command -v chromium >/dev/null 2>&1 || { echo "browser: chromium installed but not on PATH" >&2; exit 1; }
else
  echo "browser: no Chromium or Chrome here and no apt-get as root to install one: the chat page's browser tests will be skipped (install one, or set CHROMIUM=/path/to/it)" >&2
fi
exit 0
