// Small stand-ins for the browser's network objects, for the unit tests of
// the client module under Node: a scripted fetch() whose responses are
// real `Response`s over streams the test writes into (and which record
// whether the module still holds them open), and an EventSource the test
// opens, feeds and fails by hand.

import { mock } from 'node:test';

const encoder = new TextEncoder();

/** One response body the test writes into; `open` is false once the module let it go. */
export class Body {
  constructor(signal) {
    this.open = true;
    this.stream = new ReadableStream({
      start: (controller) => {
        this.controller = controller;
      },
      cancel: () => {
        this.open = false;
      },
    });
    signal?.addEventListener('abort', () => {
      if (!this.open) return;
      this.open = false;
      try {
        this.controller.error(new DOMException('aborted', 'AbortError'));
      } catch {
        // Already closed.
      }
    });
  }

  push(text) {
    if (this.open) this.controller.enqueue(encoder.encode(text));
  }

  end() {
    if (!this.open) return;
    this.open = false;
    this.controller.close();
  }
}

/**
 * fetch() answered by `handler(request)`; every request is kept, with its
 * method, URL, headers and (for streams) its body.
 */
export class FakeServer {
  constructor(handler) {
    this.requests = [];
    this.handler = handler;
    this.fetch = async (url, init = {}) => {
      const req = {
        url: String(url),
        method: init.method || 'GET',
        headers: { ...(init.headers || {}) },
        signal: init.signal,
        body: null,
      };
      this.requests.push(req);
      if (init.signal?.aborted) throw new DOMException('aborted', 'AbortError');
      return this.handler(req, this);
    };
  }

  /** Stream requests (GET) in order. */
  get gets() {
    return this.requests.filter((r) => r.method === 'GET');
  }

  /** Bodies the module still holds open. */
  get openBodies() {
    return this.requests.filter((r) => r.body?.open).length;
  }
}

/** A 200 event stream for `req`, starting with `text`. */
export function eventStream(req, text = '') {
  req.body = new Body(req.signal);
  if (text) req.body.push(text);
  return new Response(req.body.stream, {
    status: 200,
    headers: { 'Content-Type': 'text/event-stream' },
  });
}

/** A refusal. */
export function refuse(status, headers = {}) {
  return new Response(JSON.stringify({ error: { code: 'refused' } }), { status, headers });
}

/** One SSE event block. */
export function sse(type, data, id) {
  const head = id === undefined ? '' : `id: ${id}\n`;
  return `${head}event: ${type}\ndata: ${typeof data === 'string' ? data : JSON.stringify(data)}\n\n`;
}

/** An EventSource driven by the test. */
export class FakeEventSource {
  static CONNECTING = 0;
  static OPEN = 1;
  static CLOSED = 2;
  static instances = [];

  constructor(url) {
    this.url = url;
    this.readyState = FakeEventSource.CONNECTING;
    this.lastEventId = '';
    this.listeners = new Map();
    this.onopen = null;
    this.onerror = null;
    FakeEventSource.instances.push(this);
  }

  addEventListener(type, fn) {
    if (!this.listeners.has(type)) this.listeners.set(type, []);
    this.listeners.get(type).push(fn);
  }

  close() {
    this.readyState = FakeEventSource.CLOSED;
  }

  get closed() {
    return this.readyState === FakeEventSource.CLOSED;
  }

  /** The server answered 200. */
  open() {
    this.readyState = FakeEventSource.OPEN;
    this.onopen?.({ type: 'open' });
  }

  /**
   * One event, as EventSource dispatches it (never after close()): to the
   * listeners of its type and, as a browser does, to the `on<type>` handler
   * of that name — a server's `event: error` reaches `onerror`, `event: open`
   * reaches `onopen`, as a MessageEvent (with `data`).
   */
  emit(type, data, id) {
    if (this.closed) return;
    if (id !== undefined) this.lastEventId = id;
    const payload = typeof data === 'string' ? data : JSON.stringify(data);
    const ev = { type, data: payload, lastEventId: this.lastEventId };
    for (const fn of this.listeners.get(type) || []) fn(ev);
    if (type === 'open' || type === 'error' || type === 'message') this[`on${type}`]?.(ev);
  }

  /** An error: `CONNECTING` (EventSource will retry by itself) or `CLOSED` (it gave up). */
  fail(readyState = FakeEventSource.CONNECTING) {
    this.readyState = readyState;
    this.onerror?.({ type: 'error' });
  }

  static get last() {
    return FakeEventSource.instances[FakeEventSource.instances.length - 1];
  }
}

/** Lets promises, stream pipes and fetch() bodies move (setImmediate is not faked). */
export async function flush(rounds = 20) {
  for (let i = 0; i < rounds; i++) await new Promise((resolve) => setImmediate(resolve));
}

/**
 * Installs the fakes and fake timers (setTimeout and Date, from 0) for one
 * test; returns what it needs and undoes everything in `t.after`.
 */
export function setup(t, handler) {
  const server = new FakeServer(handler);
  const saved = {
    fetch: globalThis.fetch,
    EventSource: globalThis.EventSource,
    location: globalThis.location,
  };
  globalThis.fetch = server.fetch;
  globalThis.EventSource = FakeEventSource;
  globalThis.location = { href: 'http://app.test/' };
  FakeEventSource.instances = [];
  mock.timers.enable({ apis: ['setTimeout', 'Date'], now: 0 });
  const streams = [];
  t.after(() => {
    for (const s of streams) s.close();
    mock.timers.reset();
    mock.restoreAll();
    Object.assign(globalThis, saved);
  });
  return {
    server,
    /** Closed after the test. */
    track(stream) {
      streams.push(stream);
      return stream;
    },
    async tick(ms) {
      mock.timers.tick(ms);
      await flush();
    },
  };
}

/** Records what a stream delivers and reports. */
export function record(stream) {
  const got = { events: [], states: [], errors: [] };
  stream.on('*', (ev) => got.events.push(ev));
  stream.onState((s) => got.states.push(s));
  stream.onError((e) => got.errors.push(e));
  got.names = () => got.events.map((e) => (e.type === 'chat_message' ? e.data.text : e.type));
  got.waits = () => got.states.filter((s) => s.state === 'reconnecting');
  return got;
}
