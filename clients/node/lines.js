// Splitting a byte stream into lines (the worker's stdout and stderr).
import { StringDecoder } from 'node:string_decoder';

// Small pure helpers (exported for unit tests)

/**
 * Incremental splitter of a byte stream into lines. Handles chunks that split lines and
 * UTF-8 characters; strips a trailing '\r'; skips blank lines.
 */
export class LineSplitter {
  /** @param {{ maxLineChars?: number }} [opts] */
  constructor(opts = {}) {
    this._decoder = new StringDecoder('utf8');
    this._buf = '';
    this._max = opts.maxLineChars ?? 64 * 1024 * 1024;
    /** Number of lines dropped because they exceeded maxLineChars. */
    this.overflows = 0;
    this._skipping = false;
  }

  /**
   * @param {Buffer | string} chunk
   * @returns {string[]} complete lines found so far
   */
  push(chunk) {
    const text = typeof chunk === 'string' ? chunk : this._decoder.write(chunk);
    return this._split(text, false);
  }

  /** @returns {string[]} the last line if the stream did not end with '\n' */
  end() {
    return this._split(this._decoder.end(), true);
  }

  /** @param {string} text @param {boolean} final */
  _split(text, final) {
    const out = [];
    let start = 0;
    let nl;
    while ((nl = text.indexOf('\n', start)) !== -1) {
      const piece = text.slice(start, nl);
      start = nl + 1;
      if (this._skipping) {
        this._skipping = false;
        this._buf = '';
        continue;
      }
      this._emit(this._buf + piece, out);
      this._buf = '';
    }
    if (!this._skipping) {
      this._buf += text.slice(start);
      if (this._buf.length > this._max) {
        this.overflows += 1;
        this._skipping = true;
        this._buf = '';
      }
    }
    if (final) {
      if (!this._skipping) this._emit(this._buf, out);
      this._buf = '';
      this._skipping = false;
    }
    return out;
  }

  /** @param {string} line @param {string[]} out */
  _emit(line, out) {
    if (line.endsWith('\r')) line = line.slice(0, -1);
    if (line.trim() !== '') out.push(line);
  }
}
