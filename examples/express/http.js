// Small HTTP pieces shared by the app's routes (app.js, openai.js).

export const LIMITS = Object.freeze({
  body: '64kb',
  maxMessages: 64,
  maxTokens: 2048,
  maxTemperature: 2,
});

/** The answer to a client-sent system message while ALLOW_CLIENT_SYSTEM is off. */
export const SYSTEM_REFUSED = 'system messages are set by the server; send user and assistant messages only';

/** Resolves true when the chunk was written (waiting for 'drain' if needed), false if the client left. */
export function writeWithBackpressure(res, chunk) {
  if (res.destroyed || res.writableEnded) return Promise.resolve(false);
  if (res.write(chunk)) return Promise.resolve(true);
  return new Promise((resolve) => {
    const done = (ok) => { res.off('drain', onDrain); res.off('close', onClose); resolve(ok); };
    const onDrain = () => done(true);
    const onClose = () => done(false);
    res.on('drain', onDrain);
    res.on('close', onClose);
  });
}

/** An AbortController aborted when the client goes away before the response is finished. */
export function abortOnClose(res) {
  const ac = new AbortController();
  res.on('close', () => { if (!res.writableFinished) ac.abort(); });
  return ac;
}
