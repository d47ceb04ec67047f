// sse-scale.js — the browser client of an sse-scale event stream
// (`GET /sessions/{id}/events`), as a plain ES module with no build step.
//
// Two transports behind one API (see sse-scale.d.ts and docs/browser.md):
//
// - `SseScaleStream` uses the browser's EventSource. It asks the server for
//   heartbeats as events (`?heartbeat=event`), which EventSource can see,
//   unlike comments. When a stream that had been healthy breaks, the
//   browser's own reconnect (after the server's jittered `retry:` hint) is
//   allowed once; any further failure — a refused connection, a stream that
//   dies right after opening, a non-200 answer (EventSource gives up for
//   good on those and cannot read the status) — closes the EventSource and
//   the module takes over: one HEAD probe for the status and `Retry-After`,
//   its own backoff, then a new EventSource with `?last_event_id=`.
// - `SseScaleFetchStream` reads the stream with fetch() and a WHATWG event
//   stream parser, for deployments that route on the `X-Session-ID` header,
//   which EventSource cannot send. It sends X-Session-ID, Authorization and
//   Last-Event-ID itself and sees every status and `Retry-After` directly.
//
// What both keep, across reconnects, close()/open(), held events, overflow
// and parser errors: every event the server delivered reaches the app's
// listeners once, in stream order, or the app gets the server's `reset`.
// Two positions make that hold: the id of the last event delivered to the
// app, and the id of the last one received (ahead of it while a resync holds
// events back). A reconnect resumes from the received one; whenever held
// events are dropped (close(), overflow) the received position goes back to
// the delivered one, so the server sends them again.

export const CONNECTING = 'connecting';
export const OPEN = 'open';
export const RECONNECTING = 'reconnecting';
export const CLOSED = 'closed';

/** Event types a stream of the reference server carries (EventSource needs
 * a listener per name; `on()` adds any other). */
export const SERVER_EVENTS = Object.freeze([
  'connected',
  'reset',
  'message',
  'chat_message',
  'replan',
  'preferences_updated',
  'stage_start',
  'section_draft',
  'stage_complete',
  'gate_waiting',
  'gate_resolved',
  'pipeline_complete',
  'pipeline_failed',
  'pipeline_cancelled',
]);

/**
 * Event names apps cannot publish (the server refuses them, as
 * `RESERVED_EVENT_TYPES` in src/event.rs): the protocol's own, the names
 * EventSource gives its own meaning (a server's `event: error` would reach
 * `onerror` and pass for a broken connection, `event: open` for a new one),
 * and `'*'`, which `on()` takes as "every event".
 */
export const RESERVED_EVENTS = Object.freeze(['connected', 'reset', 'heartbeat', 'open', 'error', '*']);

// Names no app listener gets: heartbeats are liveness only, and `open` and
// `error` on EventSource are the browser's own events, which `on()` must
// not hand over as the server's.
const NOT_APP_EVENTS = new Set(['heartbeat', 'open', 'error']);

function notAppEvent(type) {
  return new TypeError(`sse-scale: \`${type}\` is not an app event`);
}

const BACKOFF_DEFAULTS = Object.freeze({
  initialMs: 1000,
  maxMs: 30000,
  factor: 2,
  // Spread: the backoff is drawn from [1 - jitter, 1] of its value, and a
  // Retry-After wait from [1, 1 + jitter] of it, so clients refused at the
  // same moment (a drain) do not all come back at the same moment.
  jitter: 0.3,
  // A stream open this long counts as healthy: the backoff starts over. A
  // shorter-lived one (opens, then dies) keeps climbing it.
  stableMs: 5000,
});

/** setTimeout fires at once for anything above this (a signed 32-bit int). */
export const MAX_DELAY_MS = 2 ** 31 - 1;
/** The shortest wait before a reconnect: `retry: 0` must not spin. */
export const MIN_DELAY_MS = 100;

const DEFAULT_HEARTBEAT_MS = 15000;
// What the liveness deadline adds to two heartbeat intervals: a heartbeat
// may leave late on a busy server and travel through slow proxies.
const LIVENESS_MARGIN_MS = 5000;
// Heartbeat intervals a `connected` event may announce; anything outside is
// taken as the nearest bound rather than trusted.
const HEARTBEAT_BOUNDS = [500, 10 * 60 * 1000];

// Answers that no amount of waiting fixes: a bad request, a token that is
// missing, expired or for another session, a route that does not exist.
const FATAL_STATUSES = new Set([400, 401, 403, 404, 405, 410]);
// Answers to the HEAD probe that say nothing about the stream: a proxy that
// does not pass HEAD on.
const PROBE_UNANSWERED = new Set([405, 501]);

/** A timer value setTimeout honours: finite, at least `min`, at most 2^31−1. */
export function clampDelay(ms, min = MIN_DELAY_MS) {
  const n = Number(ms);
  if (Number.isNaN(n)) return min;
  return Math.round(Math.min(MAX_DELAY_MS, Math.max(min, n)));
}

/**
 * Parses a `Retry-After` value into milliseconds from `now` (RFC 9110
 * §10.2.3): delay-seconds, digits only, or an HTTP-date; `null` when
 * absent or anything else. `Date.parse` is not used: it reads far more
 * than HTTP-dates (`1.5` is a date in 2001, hence a wait of 0).
 */
export function parseRetryAfter(value, now = Date.now()) {
  if (value == null) return null;
  const text = String(value).trim();
  if (text === '') return null;
  if (/^\d+$/.test(text)) return Number(text) * 1000;
  const at = parseHttpDate(text, now);
  if (at === null) return null;
  return Math.max(0, at - now);
}

const MONTHS = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'];
const DAY = '(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)';
const LONG_DAY = '(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)';
const MONTH = `(${MONTHS.join('|')})`;
const TIME = '(\\d{2}):(\\d{2}):(\\d{2})';
// The three forms of RFC 9110 §5.6.7, all in GMT: IMF-fixdate, the obsolete
// RFC 850 form (two-digit year) and asctime's.
const IMF_FIXDATE = new RegExp(`^${DAY}, (\\d{2}) ${MONTH} (\\d{4}) ${TIME} GMT$`);
const RFC850_DATE = new RegExp(`^${LONG_DAY}, (\\d{2})-${MONTH}-(\\d{2}) ${TIME} GMT$`);
const ASCTIME_DATE = new RegExp(`^${DAY} ${MONTH} ([ \\d]\\d) ${TIME} (\\d{4})$`);

/** An HTTP-date in milliseconds since the epoch; `null` for anything else. */
function parseHttpDate(text, now) {
  let day, month, year, h, min, sec;
  let m = IMF_FIXDATE.exec(text);
  if (m) {
    [, day, month, year, h, min, sec] = m;
  } else if ((m = RFC850_DATE.exec(text))) {
    [, day, month, year, h, min, sec] = m;
    // A two-digit year more than 50 years ahead is in the past century.
    const current = new Date(now).getUTCFullYear();
    year = Number(year) + Math.floor(current / 100) * 100;
    if (year > current + 50) year -= 100;
  } else if ((m = ASCTIME_DATE.exec(text))) {
    [, month, day, h, min, sec, year] = m;
  } else {
    return null;
  }
  const fields = [Number(year), MONTHS.indexOf(month), Number(day), Number(h), Number(min), Number(sec)];
  const at = Date.UTC(...fields);
  const d = new Date(at);
  // No 31 November, no 25:00: Date.UTC would roll those over.
  const back = [d.getUTCFullYear(), d.getUTCMonth(), d.getUTCDate(), d.getUTCHours(), d.getUTCMinutes(), d.getUTCSeconds()];
  if (fields[3] > 23 || fields[4] > 59 || fields[5] > 60 || back.slice(0, 3).some((v, i) => v !== fields[i])) return null;
  return at;
}

/**
 * The wait before reconnect attempt `attempt` (1 for the first): an
 * exponential backoff with jitter, capped at `maxMs`, never shorter than
 * `retryAfterMs`, and always a value a timer honours (`clampDelay`).
 */
export function retryDelay(attempt, retryAfterMs = null, backoff = {}, random = Math.random) {
  const b = { ...BACKOFF_DEFAULTS, ...backoff };
  const exp = Math.min(b.maxMs, b.initialMs * b.factor ** Math.max(0, attempt - 1));
  const spread = exp * (1 - b.jitter * random());
  if (retryAfterMs == null) return clampDelay(spread);
  // A server asking for a longer wait than maxMs is still obeyed.
  return clampDelay(Math.max(spread, retryAfterMs * (1 + b.jitter * random())));
}

/**
 * A parser for `text/event-stream` following the WHATWG rules: lines end
 * with CRLF, LF or CR; `:` starts a comment; `data` lines join with LF;
 * `id` (without NUL) sets the last event id, which persists across events;
 * `retry` takes digits only; unknown fields are ignored; an event without
 * data is not dispatched; a block cut off by the end of the stream is
 * dropped (call `reset()` before reading a new response).
 */
export class SseParser {
  /**
   * @param {{onEvent?: Function, onRetry?: Function, onComment?: Function,
   *          maxLineLength?: number}} handlers
   */
  constructor({ onEvent, onRetry, onComment, maxLineLength = 1 << 20 } = {}) {
    this.onEvent = onEvent;
    this.onRetry = onRetry;
    this.onComment = onComment;
    this.maxLineLength = maxLineLength;
    this.lastEventId = '';
    this.reset();
  }

  /** Forgets a partial line and block (a new response), keeps the id. */
  reset() {
    this._buf = '';
    this._skipLF = false;
    this._first = true;
    this._type = '';
    this._data = [];
    this._idBuffer = this.lastEventId;
  }

  /** Feeds decoded text; dispatches every complete line. */
  feed(text) {
    if (text === '') return;
    if (this._first) {
      this._first = false;
      if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
    }
    if (this._skipLF) {
      this._skipLF = false;
      if (text.charCodeAt(0) === 10) text = text.slice(1);
    }
    const buf = this._buf + text;
    let start = 0;
    const ends = /[\r\n]/g;
    let m;
    while ((m = ends.exec(buf)) !== null) {
      const i = m.index;
      // The limit holds for complete lines too: a long line must be refused
      // whether it came in one chunk or in many.
      if (i - start > this.maxLineLength) this._tooLong();
      this._line(buf.slice(start, i));
      if (buf.charCodeAt(i) === 13) {
        if (i + 1 === buf.length) {
          // A CR at the end of a chunk may be the first half of a CRLF.
          this._skipLF = true;
        } else if (buf.charCodeAt(i + 1) === 10) {
          ends.lastIndex = i + 2;
        }
      }
      start = ends.lastIndex;
    }
    this._buf = buf.slice(start);
    if (this._buf.length > this.maxLineLength) this._tooLong();
  }

  _tooLong() {
    this._buf = '';
    this._skipLF = false;
    throw new Error(`event stream line longer than ${this.maxLineLength} characters`);
  }

  _line(line) {
    if (line === '') {
      this._dispatch();
      return;
    }
    if (line.charCodeAt(0) === 58 /* : */) {
      if (this.onComment) this.onComment(line.slice(1));
      return;
    }
    const colon = line.indexOf(':');
    let field = line;
    let value = '';
    if (colon !== -1) {
      field = line.slice(0, colon);
      value = line.slice(colon + 1);
      if (value.charCodeAt(0) === 32) value = value.slice(1);
    }
    switch (field) {
      case 'event':
        this._type = value;
        break;
      case 'data':
        this._data.push(value);
        break;
      case 'id':
        if (!value.includes('\u0000')) this._idBuffer = value;
        break;
      case 'retry':
        if (/^\d+$/.test(value) && this.onRetry) this.onRetry(Number(value));
        break;
      default:
        break;
    }
  }

  _dispatch() {
    this.lastEventId = this._idBuffer;
    if (this._data.length === 0) {
      this._type = '';
      return;
    }
    const event = {
      type: this._type || 'message',
      data: this._data.join('\n'),
      id: this.lastEventId,
    };
    this._type = '';
    this._data = [];
    if (this.onEvent) this.onEvent(event);
  }
}

export function compareIds(a, b) {
  const pa = /^(\d+)-(\d+)$/.exec(a ?? '');
  const pb = /^(\d+)-(\d+)$/.exec(b ?? '');
  if (!pa || !pb) return null;
  for (const i of [1, 2]) {
    const x = BigInt(pa[i]);
    const y = BigInt(pb[i]);
    if (x !== y) return x < y ? -1 : 1;
  }
  return 0;
}

/**
 * `data` as the publisher sent it. The server's payloads are JSON text
 * (`POST /sessions/{id}/events` sends `data` exactly as given), so JSON
 * text decodes to the very value published: `"123"` on the wire is the
 * string "123", `123` the number 123. Text that is not JSON (a server
 * outside that contract) stays the string it is.
 */
function decodeJson(raw) {
  try {
    return JSON.parse(raw);
  } catch {
    return raw;
  }
}

function abortError(signal) {
  if (signal?.reason !== undefined) return signal.reason;
  const error = new Error('the operation was aborted');
  error.name = 'AbortError';
  return error;
}

function isAbort(error) {
  return error?.name === 'AbortError';
}

/**
 * What both transports share: listeners, state, the two positions, reset
 * handling, the reconnect policy and the liveness deadline.
 */
class StreamBase {
  constructor(options) {
    if (!options || !options.url) throw new TypeError('sse-scale: `url` is required');
    this.options = options;
    this._backoff = { ...BACKOFF_DEFAULTS, ...(options.backoff || {}) };
    this._listeners = new Map();
    this._stateListeners = new Set();
    this._errorListeners = new Set();
    this._types = new Set([...SERVER_EVENTS, ...(options.events || [])]);
    for (const name of this._types) {
      if (NOT_APP_EVENTS.has(name) || name === '*') throw notAppEvent(name);
    }
    const decode = options.decode ?? 'json';
    if (decode === 'json') this._decode = decodeJson;
    else if (decode === 'text') this._decode = (raw) => raw;
    else if (typeof decode === 'function') this._decode = decode;
    else throw new TypeError("sse-scale: `decode` is 'json', 'text' or a function");
    // The last event delivered to the app, and the last one received from
    // the transport (ahead while a resync holds events back). Reconnects
    // resume from the received one, so held events are not sent twice.
    this._position = options.lastEventId || null;
    this._received = this._position;
    this._state = null;
    this._closed = true;
    // The current connection (an object per connect); events and failures
    // of any other are ignored, which is what stops a dropped connection's
    // remaining bytes from reaching the app.
    this._conn = null;
    // Bumped whenever the module lets go of everything it was holding
    // (close(), a refusal): a batch of held events being delivered belongs
    // to one generation, and stops the moment that one ends, even if a
    // listener opened the stream again at once (the new connection sends
    // the rest again, from the delivered position).
    this._gen = 0;
    this._attempt = 0;
    this._timer = null;
    // The current wait was set by the server's Retry-After: nothing cuts it short.
    this._timerFloored = false;
    // The HEAD probe in flight (EventSource transport).
    this._probe = null;
    this._stableTimer = null;
    this._livenessTimer = null;
    this._heartbeatMs = DEFAULT_HEARTBEAT_MS;
    this._resyncing = false;
    this._resyncReset = null;
    this._resyncRun = 0;
    this._resyncCtrl = null;
    this._held = [];
    this._overflowed = false;
    this._maxHeld = options.maxHeldEvents ?? 10000;
    // Aborted by close(): cancels history reads in flight.
    this._life = new AbortController();
    this._onOnline = () => this._wake('online');
    this._onVisibility = () => {
      if (globalThis.document?.visibilityState === 'visible') this._wake('visible');
    };
    this.instanceId = null;
    this.reconnects = 0;
  }

  /** The id of the last event delivered (what a reconnect resumes from). */
  get lastEventId() {
    return this._position;
  }

  get state() {
    return this._state;
  }

  /**
   * Listens to events of one type (`'*'`: every event of the stream's
   * types); returns an unsubscribe function. `heartbeat`, `open` and
   * `error` throw: on EventSource the last two would get the browser's own
   * events (use `onState` and `onError`).
   */
  on(type, fn) {
    if (NOT_APP_EVENTS.has(type)) throw notAppEvent(type);
    if (!this._listeners.has(type)) this._listeners.set(type, new Set());
    this._listeners.get(type).add(fn);
    if (type !== '*' && !this._types.has(type)) {
      this._types.add(type);
      this._listenType(type);
    }
    return () => this._listeners.get(type)?.delete(fn);
  }

  /** Listens to state changes; returns an unsubscribe function. */
  onState(fn) {
    this._stateListeners.add(fn);
    return () => this._stateListeners.delete(fn);
  }

  /** Listens to errors: listeners, the resync hook, the token function, the parser. */
  onError(fn) {
    this._errorListeners.add(fn);
    return () => this._errorListeners.delete(fn);
  }

  /** Opens the stream (called by the constructor unless `open: false`). */
  open() {
    if (this._state !== null && this._state !== CLOSED) return this;
    this._closed = false;
    this._attempt = 0;
    this._environment(true);
    this._setState(CONNECTING, {});
    // A resync that close() interrupted runs again: what it was to reload
    // is still missing, and nothing after the reset is delivered before it.
    if (this._resyncing && this._resyncReset) this._runResync(this._resyncReset);
    if (!this._closed) this._start();
    return this;
  }

  /** Closes the stream; no reconnect follows and no further event is delivered. */
  close() {
    if (this._closed) return;
    this._shutdown();
    this._setState(CLOSED, { reason: 'closed' });
  }

  /**
   * Everything close() and a refusal share: the connection, timers and
   * history reads stop; held events are dropped and the received position
   * goes back to the delivered one, so the next open() gets them again; a
   * resync in progress is interrupted and runs again on open().
   */
  _shutdown() {
    this._closed = true;
    this._gen += 1;
    clearTimeout(this._timer);
    this._timer = null;
    this._stop();
    this._environment(false);
    this._held = [];
    this._overflowed = false;
    this._received = this._position;
    if (this._resyncing) {
      this._resyncRun += 1;
      this._resyncCtrl?.abort();
      this._resyncCtrl = null;
    }
    this._life.abort();
    this._life = new AbortController();
  }

  _environment(on) {
    const g = globalThis;
    const method = on ? 'addEventListener' : 'removeEventListener';
    if (typeof g[method] === 'function') g[method]('online', this._onOnline);
    if (g.document && typeof g.document[method] === 'function') {
      g.document[method]('visibilitychange', this._onVisibility);
    }
  }

  /**
   * Reads the events after `from` up to and including `to` from the
   * server's history (a short-lived stream read with fetch), e.g. to rebuild
   * state after a `reset` whose `oldest_id` and id bound what history still
   * holds. Resolves with the events in order. The history is a sliding
   * window: if it dropped `from` meanwhile (the read itself gets a reset),
   * the read starts again after the oldest event it now holds, and
   * `complete` is false. Rejects (AbortError) when `signal` aborts or the
   * stream is closed meanwhile.
   */
  async readHistory({ from, to, timeoutMs = 10000, signal } = {}) {
    const life = this._life.signal;
    if (signal?.aborted) throw abortError(signal);
    let cursor = from;
    let complete = true;
    for (let round = 0; round < 3; round++) {
      if (!cursor || !to || cursor === to || to === '0-0') return { events: [], complete };
      const read = await this._readOnce(cursor, to, timeoutMs, signal, life);
      if (!read.reset) return { events: read.events, complete };
      complete = false;
      const oldest = read.reset.data?.oldest_id ?? null;
      // Nothing of the range is left once the oldest event held is past `to`.
      if (!oldest || compareIds(oldest, to) !== -1) return { events: [], complete };
      cursor = oldest;
    }
    return { events: [], complete: false };
  }

  async _readOnce(from, to, timeoutMs, signal, life) {
    const ctrl = new AbortController();
    let why = null;
    const stopBy = (source) => () => {
      why = source;
      ctrl.abort();
    };
    const onSignal = stopBy(signal);
    const onClose = stopBy(life);
    signal?.addEventListener('abort', onSignal, { once: true });
    life.addEventListener('abort', onClose, { once: true });
    const timer = setTimeout(stopBy('timeout'), clampDelay(timeoutMs, 0));
    const events = [];
    let reset = null;
    try {
      const res = await fetch(this.options.url, {
        headers: await this._headers(from),
        cache: 'no-store',
        credentials: 'same-origin',
        signal: ctrl.signal,
      });
      if (res.status !== 200 || !res.body) {
        res.body?.cancel().catch(() => {});
        throw new Error(`history read answered ${res.status}`);
      }
      let done = false;
      const parser = new SseParser({
        maxLineLength: this.options.maxLineLength,
        onEvent: (ev) => {
          if (done || ev.type === 'connected' || ev.type === 'heartbeat') return;
          if (ev.type === 'reset') {
            reset = { id: ev.id, data: decodeJson(ev.data) };
            done = true;
            return;
          }
          // Past `to` (dropped while reading): the range is over.
          if (compareIds(ev.id, to) === 1) {
            done = true;
            return;
          }
          const event = { type: ev.type, id: ev.id, data: ev.data, raw: ev.data };
          this._decodeData(event);
          events.push(event);
          if (ev.id === to) done = true;
        },
      });
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      while (!done) {
        const { value, done: end } = await reader.read();
        if (end) throw new Error('history read ended before its last event');
        parser.feed(value);
      }
      await reader.cancel().catch(() => {});
      return { events, reset };
    } catch (error) {
      if (why === 'timeout') throw new Error(`history read took longer than ${timeoutMs} ms`);
      if (why) throw abortError(why === life ? null : why);
      throw error;
    } finally {
      clearTimeout(timer);
      signal?.removeEventListener('abort', onSignal);
      life.removeEventListener('abort', onClose);
      ctrl.abort();
    }
  }

  // --- for the transports ---

  async _token() {
    const t = this.options.token;
    return typeof t === 'function' ? await t() : t;
  }

  /** Headers of a fetch() read: the token in a header, not the URL. */
  async _headers(lastEventId) {
    const headers = { Accept: 'text/event-stream' };
    const token = await this._token();
    if (token) headers.Authorization = `Bearer ${token}`;
    if (this.options.sessionId) headers['X-Session-ID'] = this.options.sessionId;
    if (lastEventId) headers['Last-Event-ID'] = lastEventId;
    return headers;
  }

  _setState(state, info) {
    this._state = state;
    const change = { state, at: Date.now(), ...info };
    for (const fn of this._stateListeners) this._call(fn, change);
  }

  _call(fn, arg) {
    try {
      fn(arg);
    } catch (error) {
      this._error(error);
    }
  }

  _error(error) {
    if (this._errorListeners.size === 0) {
      console.error('sse-scale:', error);
      return;
    }
    for (const fn of this._errorListeners) {
      try {
        fn(error);
      } catch (e) {
        console.error('sse-scale: error listener threw', e);
      }
    }
  }

  /** A new connection becomes the current one; the liveness deadline covers its connect. */
  _newConn(extra = {}) {
    const conn = { open: false, events: 0, liveness: true, deadline: null, ...extra };
    this._conn = conn;
    this._alive(conn);
    return conn;
  }

  /** How long a stream may stay silent: `idleTimeoutMs`, else two heartbeats and a margin (0: no deadline). */
  _livenessMs() {
    const idle = this.options.idleTimeoutMs;
    if (idle != null) return idle > 0 ? clampDelay(idle) : 0;
    return clampDelay(2 * this._heartbeatMs + LIVENESS_MARGIN_MS);
  }

  /** Something arrived on `conn` (or it started): the liveness deadline starts over. */
  _alive(conn) {
    if (conn !== this._conn) return;
    clearTimeout(this._livenessTimer);
    this._livenessTimer = null;
    conn.deadline = null;
    let ms = conn.liveness ? this._livenessMs() : 0;
    if (ms <= 0) return;
    // The deadline bounds a connect, never a wait the module or the browser
    // makes on purpose (the fetch transport starts it after its wait).
    // EventSource waits out the server's `retry:` hint by itself and shows
    // neither the hint nor the moment it connects: until it opens again the
    // deadline also allows the longest wait the module would make itself.
    if (conn.browserRetry) ms = clampDelay(ms + this._backoff.maxMs);
    conn.deadline = Date.now() + ms;
    this._livenessTimer = setTimeout(() => {
      this._livenessTimer = null;
      this._fail(conn, { reason: 'idle', hintMs: this._hint() });
    }, ms);
  }

  /** The server's `retry:` hint, when the transport can see it. */
  _hint() {
    return null;
  }

  /** The stream answered 200: the state is open; the backoff starts over once it stays up. */
  _opened(conn, info = {}) {
    conn.open = true;
    conn.events = 0;
    clearTimeout(this._stableTimer);
    conn.stable = false;
    this._stableTimer = setTimeout(() => {
      this._stableTimer = null;
      if (this._conn !== conn) return;
      conn.stable = true;
      this._attempt = 0;
    }, clampDelay(this._backoff.stableMs, 0));
    this._alive(conn);
    this._setState(OPEN, info);
  }

  /** `conn` failed or ended: drop it and schedule the next connect (a stale one is ignored). */
  _fail(conn, info) {
    if (conn !== this._conn || this._closed) return;
    this._stop();
    // The server's hint paces only the reconnect after a healthy stream;
    // one that died young backs off.
    if (!conn.stable) delete info.hintMs;
    this._retry(info);
  }

  /** Drops the current connection, its timers and any probe. */
  _stop() {
    const conn = this._conn;
    this._conn = null;
    clearTimeout(this._livenessTimer);
    this._livenessTimer = null;
    clearTimeout(this._stableTimer);
    this._stableTimer = null;
    this._probe?.abort();
    this._probe = null;
    if (conn) this._teardown(conn);
  }

  /** One event from the transport, in stream order. */
  _receive(raw, conn) {
    if (conn !== this._conn || this._closed) return;
    this._alive(conn);
    // Heartbeats are liveness only, never an app event.
    if (raw.type === 'heartbeat') return;
    conn.events += 1;
    const protocol = raw.type === 'connected' || raw.type === 'reset';
    const ev = {
      type: raw.type,
      id: raw.id || null,
      // The app's `decode` runs when the event is delivered (_deliver).
      data: protocol ? decodeJson(raw.data) : raw.data,
      raw: raw.data,
    };
    if (raw.type === 'connected') {
      if (conn.events === 1) {
        this._connected(conn, ev.data);
      } else {
        // Only the first event of a connection is the server's `connected`.
        Object.defineProperty(ev, 'skip', { value: true });
        this._error(new Error('sse-scale: a `connected` event in the middle of a stream is not the server\'s; ignored'));
      }
    }
    if (this._resyncing) {
      if (this._held.length >= this._maxHeld) {
        // Holding more would grow without bound: drop what is held and the
        // connection (the rest of its bytes with it); once the app has
        // resynced, the stream resumes from the last delivered id and the
        // server sends them again.
        this._held = [];
        this._overflowed = true;
        this._received = this._position;
        this._stop();
        this._setState(RECONNECTING, { by: 'module', reason: 'held-overflow', delayMs: null, attempt: this._attempt });
        return;
      }
      if (ev.id) this._received = ev.id;
      this._held.push(ev);
      return;
    }
    if (ev.id) this._received = ev.id;
    this._deliver(ev);
  }

  /** The server's `connected`: its instance and heartbeat interval. */
  _connected(conn, data) {
    const ok = data && typeof data === 'object';
    const hb = ok ? data.heartbeat_ms : undefined;
    if (typeof hb === 'number' && Number.isFinite(hb) && hb > 0) {
      this._heartbeatMs = Math.min(HEARTBEAT_BOUNDS[1], Math.max(HEARTBEAT_BOUNDS[0], hb));
      conn.heartbeats = true;
    } else {
      conn.heartbeats = false;
    }
    this._livenessKnown(conn);
  }

  /** Called once `connected` told whether heartbeats are visible on `conn`. */
  _livenessKnown(conn) {
    this._alive(conn);
  }

  _deliver(ev) {
    if (ev.id) this._position = ev.id;
    if (ev.skip) return;
    // Only events of the stream's types reach listeners, on both
    // transports: EventSource sees no other (it needs a listener per name),
    // so the fetch transport delivers no other either — an event typed `*`
    // (not the wildcard), `open` or `error` included. Its position counts.
    if (!this._types.has(ev.type)) return;
    if (ev.type !== 'connected' && ev.type !== 'reset') this._decodeData(ev);
    if (ev.type === 'connected' && ev.data && typeof ev.data === 'object') {
      this.instanceId = typeof ev.data.instance_id === 'string' ? ev.data.instance_id : null;
    }
    // Every listener of this event gets it, even if one of them closes the
    // stream; nothing after it is delivered then.
    for (const fn of this._listeners.get(ev.type) || []) this._call(fn, ev);
    for (const fn of this._listeners.get('*') || []) this._call(fn, ev);
    if (ev.type === 'reset' && this.options.resync) {
      this._resyncing = true;
      this._resyncReset = ev;
      if (!this._closed) this._runResync(ev);
    }
  }

  /**
   * `ev.data` made by the app's `decode`. One that throws cannot take the
   * event from the stream (it counts, like any other) nor stop the stream:
   * the event keeps its text as `data`, with the error as `decodeError`,
   * and the error goes to onError (`reason: 'decode'`, the event's `id` and
   * `type`).
   */
  _decodeData(ev) {
    try {
      ev.data = this._decode(ev.raw, ev.type);
    } catch (error) {
      ev.data = ev.raw;
      ev.decodeError = error;
      const why = error instanceof Error ? error.message : String(error);
      const failure = new Error(`sse-scale: decode threw for the \`${ev.type}\` event ${ev.id}: ${why}`, { cause: error });
      Object.assign(failure, { reason: 'decode', id: ev.id, type: ev.type });
      this._error(failure);
    }
  }

  /** Runs the app's resync hook; events behind the reset wait for it. */
  _runResync(reset) {
    const run = ++this._resyncRun;
    const ctrl = new AbortController();
    this._resyncCtrl = ctrl;
    let hook;
    try {
      hook = Promise.resolve(this.options.resync(reset, this, { signal: ctrl.signal }));
    } catch (error) {
      hook = Promise.reject(error);
    }
    hook
      .catch((error) => {
        // An interrupted run's abort is the module's own doing; anything
        // else is the app's to see.
        if (!(ctrl.signal.aborted && isAbort(error))) this._error(error);
      })
      .then(() => {
        if (run !== this._resyncRun) return;
        this._resyncCtrl = null;
        this._resyncing = false;
        this._resyncReset = null;
        const held = this._held;
        this._held = [];
        const gen = this._gen;
        // Delivered one by one: a held event may be another reset, and a
        // listener may close the stream — and open it again at once, which
        // clears `_closed` but not the generation: the rest of this batch
        // was dropped with the old one, and the new connection resumes from
        // the last event delivered, so it sends them again.
        for (let i = 0; i < held.length; i++) {
          if (this._closed || gen !== this._gen) return;
          this._deliver(held[i]);
          if (gen !== this._gen) return;
          if (this._resyncing) {
            this._held = held.slice(i + 1).concat(this._held);
            return;
          }
        }
        if (this._overflowed && !this._closed && gen === this._gen) {
          this._overflowed = false;
          this._setState(RECONNECTING, { by: 'module', reason: 'held-overflow', delayMs: 0, attempt: this._attempt });
          this._start();
        }
      });
  }

  /**
   * Schedules the next connect after a failure. `status`/`retryAfterMs`
   * come from the answer when one was seen; `hintMs` is the server's
   * `retry:` hint, given only after a healthy stream ended: that first
   * reconnect waits for it, as EventSource would.
   */
  _retry(info) {
    if (this._closed) return;
    clearTimeout(this._timer);
    this._timer = null;
    if (info.status && FATAL_STATUSES.has(info.status)) {
      this._shutdown();
      this._setState(CLOSED, { reason: 'refused', ...info });
      return;
    }
    this._attempt += 1;
    const { hintMs, ...shown } = info;
    const wait = hintMs != null && info.retryAfterMs == null
      ? clampDelay(hintMs)
      : retryDelay(this._attempt, info.retryAfterMs ?? null, this._backoff);
    // A wait the server asked for — Retry-After, or its `retry:` hint after
    // a healthy stream — is not cut short by `online` or a visible page:
    // the hint spreads the clients of a dead instance over time (as
    // EventSource, which nothing can cut, keeps it).
    this._timerFloored = info.retryAfterMs != null || hintMs != null;
    this.reconnects += 1;
    this._setState(RECONNECTING, { ...shown, delayMs: wait, attempt: this._attempt, by: 'module' });
    this._timer = setTimeout(() => {
      this._timer = null;
      if (!this._closed) this._start();
    }, wait);
  }

  /**
   * The network is back (`online`) or the page is visible again: a pending
   * backoff is cut short (never a wait the server asked for: Retry-After or
   * the `retry:` hint), and a stream
   * past its liveness deadline (timers sleep in hidden tabs) is replaced.
   */
  _wake(reason) {
    if (this._closed) return;
    if (this._timer && !this._timerFloored) {
      clearTimeout(this._timer);
      this._timer = null;
      this._setState(RECONNECTING, { by: 'module', reason, delayMs: 0, attempt: this._attempt });
      this._start();
      return;
    }
    const conn = this._conn;
    if (conn && conn.deadline != null && Date.now() >= conn.deadline) {
      this._fail(conn, { reason: 'idle', hintMs: this._hint() });
    }
  }
}

/**
 * The stream over the browser's EventSource. The token goes in the URL
 * (`?token=`; use the session's stream-only token); the position after a
 * module-driven reconnect in `?last_event_id=`; `?heartbeat=event` asks for
 * heartbeats EventSource can see.
 */
export class SseScaleStream extends StreamBase {
  constructor(options) {
    super(options);
    if (options.open !== false) this.open();
  }

  async _url() {
    const url = new URL(this.options.url, globalThis.location?.href);
    const token = await this._token();
    if (token) url.searchParams.set('token', token);
    if (this._received) url.searchParams.set('last_event_id', this._received);
    else url.searchParams.delete('last_event_id');
    url.searchParams.set('heartbeat', 'event');
    return url.toString();
  }

  _start() {
    const conn = this._newConn({ es: null });
    this._url().then(
      (url) => {
        if (conn !== this._conn) return;
        const es = new EventSource(url);
        conn.es = es;
        // A server event named `open` or `error` reaches these handlers too,
        // as a MessageEvent (with `data`): it is an event of the stream (one
        // no listener gets, see _deliver), not the browser's news of a
        // connection that opened or failed.
        const sent = (e) => typeof e?.data === 'string';
        const event = (e) => this._receive({ type: e.type, id: e.lastEventId, data: e.data }, conn);
        es.onopen = (e) => {
          if (sent(e)) return event(e);
          if (conn !== this._conn) return;
          conn.browserRetry = false;
          // Until `connected` says heartbeats come as events, silence is
          // bounded only by the connect-phase deadline.
          conn.liveness = true;
          this._opened(conn, { transport: 'eventsource' });
        };
        es.onerror = (e) => (sent(e) ? event(e) : this._esError(conn, es));
        for (const type of this._types) this._bind(conn, es, type);
        this._bind(conn, es, 'heartbeat');
      },
      (error) => {
        if (conn !== this._conn) return;
        this._error(error);
        this._fail(conn, { reason: 'token' });
      },
    );
  }

  _esError(conn, es) {
    if (conn !== this._conn || this._closed) return;
    const healthy = conn.stable && es.readyState !== EventSource.CLOSED;
    if (healthy) {
      // A stream that had been up for a while broke: EventSource reconnects
      // by itself after the server's `retry:` hint (jittered per stream, so
      // the clients of a dead instance spread out), with Last-Event-ID.
      // That one attempt is left to it; if it fails too, the module takes
      // over with its backoff.
      conn.open = false;
      conn.stable = false;
      conn.browserRetry = true;
      conn.liveness = true;
      clearTimeout(this._stableTimer);
      this._stableTimer = null;
      this._attempt = 1;
      this.reconnects += 1;
      this._alive(conn);
      this._setState(RECONNECTING, { by: 'browser', delayMs: null, attempt: 1, reason: 'network' });
      return;
    }
    // EventSource gave up (a non-200 answer), or would retry in its own
    // fixed loop (a refused connection, a stream that died young): close
    // it, learn the status with a HEAD probe and back off.
    this._probeAndRetry(conn).catch((error) => this._error(error));
  }

  _bind(conn, es, type) {
    es.addEventListener(type, (e) => {
      this._receive({ type: e.type, id: e.lastEventId, data: e.data }, conn);
    });
  }

  _listenType(type) {
    const conn = this._conn;
    if (conn?.es) this._bind(conn, conn.es, type);
  }

  _livenessKnown(conn) {
    // Without `heartbeat_ms` the server sends heartbeats as comments, which
    // EventSource never shows: a quiet stream would look dead.
    conn.liveness = conn.heartbeats === true;
    this._alive(conn);
  }

  /** HEAD to the stream URL: its status and Retry-After, no stream held. */
  async _probeAndRetry(conn) {
    if (conn !== this._conn) return;
    this._stop();
    const ctrl = new AbortController();
    this._probe = ctrl;
    let url;
    try {
      url = await this._url();
    } catch (error) {
      if (this._probe !== ctrl || this._closed) return;
      this._probe = null;
      this._error(error);
      this._retry({ reason: 'token' });
      return;
    }
    const timer = setTimeout(() => ctrl.abort(), 5000);
    let info;
    try {
      const res = await fetch(url, {
        method: 'HEAD',
        cache: 'no-store',
        credentials: 'same-origin',
        signal: ctrl.signal,
      });
      const retryAfterMs = parseRetryAfter(res.headers.get('Retry-After'));
      if (PROBE_UNANSWERED.has(res.status)) {
        // Something on the way does not pass HEAD on: that says nothing
        // about the stream, so it is no reason to give up.
        info = { reason: 'probe-unanswered', probeStatus: res.status, retryAfterMs };
      } else {
        // The same reasons as the fetch transport's: a stream the server
        // would open again ended (it opened and died), anything else was
        // refused.
        info = { status: res.status, retryAfterMs, reason: res.status === 200 ? 'ended' : 'refused' };
      }
    } catch {
      info = { status: 0, reason: 'network' };
    } finally {
      clearTimeout(timer);
    }
    if (this._probe !== ctrl || this._closed) return;
    this._probe = null;
    this._retry(info);
  }

  _teardown(conn) {
    conn.es?.close();
  }
}

/**
 * The stream over fetch() and `SseParser`. Sends `Authorization`,
 * `X-Session-ID` (option `sessionId`) and `Last-Event-ID` as headers, so
 * the token stays out of URLs and header-routing balancers can place it.
 */
export class SseScaleFetchStream extends StreamBase {
  constructor(options) {
    super(options);
    // The server's `retry:` hint, used after a healthy stream ends.
    this._retryHint = options.retryMs ?? 2000;
    if (options.open !== false) this.open();
  }

  _listenType() {}

  _hint() {
    return this._retryHint;
  }

  _start() {
    const conn = this._newConn({ ctrl: new AbortController() });
    this._run(conn).catch((error) => this._error(error));
  }

  async _run(conn) {
    let headers;
    try {
      headers = await this._headers(this._received);
    } catch (error) {
      if (conn !== this._conn) return;
      this._error(error);
      this._fail(conn, { reason: 'token' });
      return;
    }
    if (conn !== this._conn) return;
    let res;
    try {
      res = await fetch(this.options.url, {
        headers,
        cache: 'no-store',
        credentials: 'same-origin',
        signal: conn.ctrl.signal,
      });
    } catch {
      this._fail(conn, { status: 0, reason: 'network' });
      return;
    }
    if (conn !== this._conn) {
      res.body?.cancel().catch(() => {});
      return;
    }
    const type = res.headers.get('Content-Type') || '';
    if (res.status !== 200 || !type.startsWith('text/event-stream') || !res.body) {
      const info = {
        status: res.status,
        retryAfterMs: parseRetryAfter(res.headers.get('Retry-After')),
        reason: res.status === 200 ? 'not-an-event-stream' : 'refused',
      };
      res.body?.cancel().catch(() => {});
      this._fail(conn, info);
      return;
    }
    this._opened(conn, { transport: 'fetch', status: 200 });
    const parser = new SseParser({
      maxLineLength: this.options.maxLineLength,
      onEvent: (ev) => this._receive(ev, conn),
      onRetry: (ms) => {
        if (conn === this._conn) this._retryHint = ms;
      },
    });
    parser.lastEventId = this._received || '';
    parser.reset();
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    try {
      for (;;) {
        let chunk;
        try {
          chunk = await reader.read();
        } catch {
          this._fail(conn, { status: 0, reason: 'network', hintMs: this._retryHint });
          return;
        }
        if (conn !== this._conn) return;
        if (chunk.done) break;
        // Any byte is life, heartbeat comments included.
        this._alive(conn);
        try {
          parser.feed(chunk.value);
        } catch (error) {
          if (conn !== this._conn) return;
          // A line over maxLineLength: the stream cannot be read past it.
          // Drop the response (the reconnect resumes before that event, so
          // the backoff, not the server's hint, paces the next tries).
          this._error(error);
          this._fail(conn, { reason: 'parse' });
          return;
        }
        // The connection may have been dropped while this chunk was parsed
        // (close(), overflow): its remaining bytes went nowhere.
        if (conn !== this._conn) return;
      }
      this._fail(conn, { reason: 'ended', hintMs: this._retryHint });
    } finally {
      if (conn !== this._conn) reader.cancel().catch(() => {});
    }
  }

  _teardown(conn) {
    conn.ctrl.abort();
  }
}

/** `transport: 'fetch'` → SseScaleFetchStream, otherwise SseScaleStream. */
export function openStream(options) {
  return options.transport === 'fetch' ? new SseScaleFetchStream(options) : new SseScaleStream(options);
}
