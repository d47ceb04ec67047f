// sse-scale.js — the browser client of an sse-scale event stream
// (`GET /sessions/{id}/events`), as a plain ES module with no build step.
//
// Two transports behind one API (see sse-scale.d.ts and docs/browser.md):
//
// - `SseScaleStream` uses the browser's EventSource. EventSource reconnects by
//   itself after a network error or a closed stream (sending Last-Event-ID),
//   but gives up for good on any non-200 answer, e.g. 503 from a draining or
//   full instance, 429 from the stream rate limit, or 502/504 from a
//   balancer, and it cannot read the status or `Retry-After`. So once it has
//   given up (readyState CLOSED) this module asks once with a HEAD request to
//   the same URL, which the server answers with the stream's status and
//   `Retry-After` without holding a stream open, waits a jittered exponential
//   backoff that is never shorter than `Retry-After`, and opens a new
//   EventSource with `?last_event_id=` (a new EventSource sends no
//   Last-Event-ID header of its own).
// - `SseScaleFetchStream` reads the stream with fetch() and a WHATWG event
//   stream parser, for deployments that route on the `X-Session-ID` header,
//   which EventSource cannot send. It sends X-Session-ID, Authorization and
//   Last-Event-ID itself and sees every status and `Retry-After` directly.
//
// Both surface the connection state (connecting, open, reconnecting with the
// delay, closed), the server's `connected` event (which instance holds the
// stream), its `reset` event (resume beyond history: the app must reload its
// state, optionally while the module holds later events back), and every
// event with its id.

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

const BACKOFF_DEFAULTS = Object.freeze({
  initialMs: 1000,
  maxMs: 30000,
  factor: 2,
  // Spread: the backoff is drawn from [1 - jitter, 1] of its value, and a
  // Retry-After wait from [1, 1 + jitter] of it, so clients refused at the
  // same moment (a drain) do not all come back at the same moment.
  jitter: 0.3,
});

// Answers that no amount of waiting fixes: a bad request, a token that is
// missing, expired or for another session, a route that does not exist.
const FATAL_STATUSES = new Set([400, 401, 403, 404, 405, 410]);

/**
 * Parses a `Retry-After` value (delay-seconds or an HTTP date) into
 * milliseconds from `now`; `null` when absent or unreadable.
 */
export function parseRetryAfter(value, now = Date.now()) {
  if (value == null) return null;
  const text = String(value).trim();
  if (text === '') return null;
  if (/^\d+$/.test(text)) return Number(text) * 1000;
  const at = Date.parse(text);
  if (Number.isNaN(at)) return null;
  return Math.max(0, at - now);
}

/**
 * The wait before reconnect attempt `attempt` (1 for the first): an
 * exponential backoff with jitter, never shorter than `retryAfterMs`.
 */
export function retryDelay(attempt, retryAfterMs = null, backoff = {}, random = Math.random) {
  const b = { ...BACKOFF_DEFAULTS, ...backoff };
  const exp = Math.min(b.maxMs, b.initialMs * b.factor ** Math.max(0, attempt - 1));
  const spread = exp * (1 - b.jitter * random());
  if (retryAfterMs == null) return Math.round(spread);
  // A server asking for a longer wait than maxMs is still obeyed.
  return Math.round(Math.max(spread, retryAfterMs * (1 + b.jitter * random())));
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
    if (this._buf.length > this.maxLineLength) {
      this._buf = '';
      throw new Error(`event stream line longer than ${this.maxLineLength} characters`);
    }
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

/**
 * Orders two sse-scale ids (`<ms>-<seq>`): -1, 0 or 1; `null` when either
 * is not of that form. Apps should treat ids as opaque; the module compares
 * them only to bound a history read.
 */
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

/** `data` as JSON when it is JSON, else the string itself. */
function decode(data) {
  try {
    return JSON.parse(data);
  } catch {
    return data;
  }
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener('abort', () => {
      clearTimeout(timer);
      resolve();
    }, { once: true });
  });
}

/**
 * What both transports share: listeners, state, the position (the id of the
 * last event delivered to the app), reset handling and reconnect timing.
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
    // Two positions: the last event delivered to the app, and the last one
    // received from the transport (ahead of it while a resync holds events
    // back). Reconnects resume from the received one, so held events are
    // not sent twice.
    this._position = options.lastEventId || null;
    this._received = this._position;
    this._state = null;
    this._attempt = 0;
    this._timer = null;
    this._closed = false;
    this._resyncing = false;
    this._held = [];
    this._overflowed = false;
    this._maxHeld = options.maxHeldEvents ?? 10000;
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

  /** Listens to events of one type (`'*'`: every event); returns an unsubscribe function. */
  on(type, fn) {
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

  /** Listens to errors thrown by listeners or the resync hook. */
  onError(fn) {
    this._errorListeners.add(fn);
    return () => this._errorListeners.delete(fn);
  }

  /** Opens the stream (called by the constructor unless `open: false`). */
  open() {
    if (this._state !== null && this._state !== CLOSED) return this;
    this._closed = false;
    this._attempt = 0;
    this._setState(CONNECTING, {});
    this._start();
    return this;
  }

  /** Closes the stream for good; no reconnect follows. */
  close() {
    if (this._closed) return;
    this._closed = true;
    clearTimeout(this._timer);
    this._timer = null;
    this._stop();
    this._held = [];
    this._setState(CLOSED, { reason: 'closed' });
  }

  /**
   * Reads the events after `from` up to and including `to` from the
   * server's history (a short-lived stream read with fetch), e.g. to rebuild
   * state after a `reset` whose `oldest_id` and id bound what history still
   * holds. Resolves with the events in order. The history is a sliding
   * window: if it dropped `from` meanwhile (the read itself gets a reset),
   * the read starts again after the oldest event it now holds, and
   * `complete` is false.
   */
  async readHistory({ from, to, timeoutMs = 10000, signal } = {}) {
    let cursor = from;
    let complete = true;
    for (let round = 0; round < 3; round++) {
      if (!cursor || !to || cursor === to || to === '0-0') return { events: [], complete };
      const read = await this._readOnce(cursor, to, timeoutMs, signal);
      if (!read.reset) return { events: read.events, complete };
      complete = false;
      const oldest = read.reset.data?.oldest_id ?? null;
      // Nothing of the range is left once the oldest event held is past `to`.
      if (!oldest || compareIds(oldest, to) !== -1) return { events: [], complete };
      cursor = oldest;
    }
    return { events: [], complete: false };
  }

  async _readOnce(from, to, timeoutMs, signal) {
    const ctrl = new AbortController();
    const stop = () => ctrl.abort();
    signal?.addEventListener('abort', stop, { once: true });
    const timer = setTimeout(stop, timeoutMs);
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
        throw new Error(`history read answered ${res.status}`);
      }
      let done = false;
      const parser = new SseParser({
        onEvent: (ev) => {
          if (done || ev.type === 'connected') return;
          if (ev.type === 'reset') {
            reset = { id: ev.id, data: decode(ev.data) };
            done = true;
            return;
          }
          // Past `to` (dropped while reading): the range is over.
          if (compareIds(ev.id, to) === 1) {
            done = true;
            return;
          }
          events.push({ type: ev.type, id: ev.id, data: decode(ev.data), raw: ev.data });
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
    } finally {
      clearTimeout(timer);
      signal?.removeEventListener('abort', stop);
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

  /** The stream answered 200: the state is open, the backoff starts over. */
  _opened(info = {}) {
    this._attempt = 0;
    this._setState(OPEN, info);
  }

  /** One event from the transport, in stream order. */
  _receive(raw) {
    if (this._closed) return;
    const ev = { type: raw.type, id: raw.id || null, data: decode(raw.data), raw: raw.data };
    if (ev.id) this._received = ev.id;
    if (this._resyncing) {
      if (this._held.length >= this._maxHeld) {
        // Holding more would grow without bound: drop what is held and the
        // connection; once the app has resynced, the stream resumes from
        // the last delivered id and the server sends them again.
        this._held = [];
        this._overflowed = true;
        this._received = this._position;
        this._stop();
        return;
      }
      if (!this._overflowed) this._held.push(ev);
      return;
    }
    this._deliver(ev);
  }

  _deliver(ev) {
    if (ev.id) this._position = ev.id;
    if (ev.type === 'connected' && ev.data && typeof ev.data === 'object') {
      this.instanceId = ev.data.instance_id ?? null;
    }
    for (const fn of this._listeners.get(ev.type) || []) this._call(fn, ev);
    for (const fn of this._listeners.get('*') || []) this._call(fn, ev);
    if (ev.type === 'reset' && this.options.resync) this._startResync(ev);
  }

  /** Runs the app's resync hook; events behind the reset wait for it. */
  _startResync(reset) {
    this._resyncing = true;
    let hook;
    try {
      hook = Promise.resolve(this.options.resync(reset, this));
    } catch (error) {
      hook = Promise.reject(error);
    }
    hook
      .catch((error) => this._error(error))
      .finally(() => {
        this._resyncing = false;
        const held = this._held;
        this._held = [];
        // Delivered one by one: a held event may be another reset.
        for (let i = 0; i < held.length; i++) {
          this._deliver(held[i]);
          if (this._resyncing) {
            this._held = held.slice(i + 1).concat(this._held);
            return;
          }
        }
        if (this._overflowed) {
          this._overflowed = false;
          if (!this._closed) this._retry({ reason: 'resync-overflow' }, 0);
        }
      });
  }

  /**
   * Schedules the next connect after a failure. `status`/`retryAfterMs`
   * come from the answer when one was seen; `delay` overrides the backoff
   * (a server's `retry:` hint after a stream that was open).
   */
  _retry(info, delay = null) {
    if (this._closed) return;
    clearTimeout(this._timer);
    if (info.status && FATAL_STATUSES.has(info.status)) {
      this._closed = true;
      this._stop();
      this._setState(CLOSED, { reason: 'refused', ...info });
      return;
    }
    this._attempt += 1;
    const wait = delay ?? retryDelay(this._attempt, info.retryAfterMs ?? null, this._backoff);
    this.reconnects += 1;
    this._setState(RECONNECTING, { ...info, delayMs: wait, attempt: this._attempt, by: 'module' });
    this._timer = setTimeout(() => {
      this._timer = null;
      if (!this._closed) this._start();
    }, wait);
  }
}

/**
 * The stream over the browser's EventSource. The token goes in the URL
 * (`?token=`; use the session's stream-only token); the position after a
 * module-driven reconnect in `?last_event_id=`.
 */
export class SseScaleStream extends StreamBase {
  constructor(options) {
    super(options);
    this._es = null;
    this._probe = null;
    if (options.open !== false) this.open();
  }

  async _url() {
    const url = new URL(this.options.url, globalThis.location?.href);
    const token = await this._token();
    if (token) url.searchParams.set('token', token);
    if (this._received) url.searchParams.set('last_event_id', this._received);
    else url.searchParams.delete('last_event_id');
    return url.toString();
  }

  _start() {
    const generation = (this._generation = (this._generation || 0) + 1);
    this._url()
      .then((url) => {
        if (this._closed || generation !== this._generation) return;
        const es = new EventSource(url);
        this._es = es;
        es.onopen = () => {
          if (this._es === es) this._opened({ transport: 'eventsource' });
        };
        es.onerror = () => {
          if (this._es !== es || this._closed) return;
          if (es.readyState === EventSource.CLOSED) {
            // EventSource has given up (a non-200 answer): find out why.
            this._es = null;
            es.close();
            this._probeAndRetry(generation).catch((error) => this._error(error));
          } else {
            // EventSource reconnects by itself (network error or a closed
            // stream), after the server's `retry:` hint, with Last-Event-ID.
            this.reconnects += 1;
            this._setState(RECONNECTING, { by: 'browser', delayMs: null });
          }
        };
        for (const type of this._types) this._bind(es, type);
      })
      .catch((error) => {
        this._error(error);
        this._retry({ reason: 'token' });
      });
  }

  _bind(es, type) {
    es.addEventListener(type, (e) => {
      if (this._es === es) this._receive({ type: e.type, id: e.lastEventId, data: e.data });
    });
  }

  _listenType(type) {
    if (this._es) this._bind(this._es, type);
  }

  /** HEAD to the stream URL: its status and Retry-After, no stream held. */
  async _probeAndRetry(generation) {
    const ctrl = new AbortController();
    this._probe = ctrl;
    const timer = setTimeout(() => ctrl.abort(), 5000);
    let info;
    try {
      const res = await fetch(await this._url(), {
        method: 'HEAD',
        cache: 'no-store',
        credentials: 'same-origin',
        signal: ctrl.signal,
      });
      info = { status: res.status, retryAfterMs: parseRetryAfter(res.headers.get('Retry-After')) };
      if (res.status === 200) info.reason = 'stream-failed';
    } catch {
      info = { status: 0, reason: 'network' };
    } finally {
      clearTimeout(timer);
      if (this._probe === ctrl) this._probe = null;
    }
    if (this._closed || generation !== this._generation) return;
    this._retry(info);
  }

  _stop() {
    this._generation = (this._generation || 0) + 1;
    this._probe?.abort();
    this._probe = null;
    if (this._es) {
      this._es.close();
      this._es = null;
    }
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
    this._ctrl = null;
    // The server's `retry:` hint, used after a stream that was open ends.
    this._retryHint = options.retryMs ?? 2000;
    this._idleMs = options.idleTimeoutMs ?? 45000;
    if (options.open !== false) this.open();
  }

  _listenType() {}

  _start() {
    const ctrl = new AbortController();
    this._ctrl = ctrl;
    this._run(ctrl).catch((error) => this._error(error));
  }

  async _run(ctrl) {
    let res;
    try {
      res = await fetch(this.options.url, {
        headers: await this._headers(this._received),
        cache: 'no-store',
        credentials: 'same-origin',
        signal: ctrl.signal,
      });
    } catch {
      if (ctrl.signal.aborted && this._ctrl !== ctrl) return;
      this._retry({ status: 0, reason: 'network' });
      return;
    }
    if (this._ctrl !== ctrl) {
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
      this._retry(info);
      return;
    }
    this._opened({ transport: 'fetch', status: 200 });
    const parser = new SseParser({
      onEvent: (ev) => this._receive(ev),
      onRetry: (ms) => {
        this._retryHint = ms;
      },
    });
    parser.lastEventId = this._received || '';
    parser.reset();
    let idle = null;
    const arm = () => {
      clearTimeout(idle);
      if (this._idleMs > 0) idle = setTimeout(() => ctrl.abort(), this._idleMs);
    };
    let reason = 'ended';
    try {
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      arm();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        arm();
        parser.feed(value);
        if (this._ctrl !== ctrl) break;
      }
    } catch {
      reason = ctrl.signal.aborted ? 'idle-or-stopped' : 'network';
    } finally {
      clearTimeout(idle);
    }
    if (this._ctrl !== ctrl || this._closed) return;
    this._ctrl = null;
    // Like EventSource: a stream that was open is reopened after the
    // server's retry hint (the server jitters it while draining).
    this._retry({ reason }, this._retryHint);
  }

  _stop() {
    const ctrl = this._ctrl;
    this._ctrl = null;
    ctrl?.abort();
  }
}

/** `transport: 'fetch'` → SseScaleFetchStream, otherwise SseScaleStream. */
export function openStream(options) {
  return options.transport === 'fetch' ? new SseScaleFetchStream(options) : new SseScaleStream(options);
}
