// Types of sse-scale.js, the browser client of an sse-scale event stream.
// See docs/browser.md for how to use it and what the server sends.

/** Connection states, in the order a stream usually goes through them. */
export const CONNECTING: 'connecting';
export const OPEN: 'open';
export const RECONNECTING: 'reconnecting';
export const CLOSED: 'closed';
export type ConnectionState = 'connecting' | 'open' | 'reconnecting' | 'closed';

/** Event types of the reference server. Both transports deliver these and every type passed to `on()` or `events`; `'*'` covers exactly that set. */
export const SERVER_EVENTS: readonly string[];

/**
 * Event types the server refuses to publish (`400 reserved_event_type`):
 * the protocol's own (`connected`, `reset`, `heartbeat`), EventSource's own
 * (`open`, `error`) and the wildcard `*`. `heartbeat`, `open` and `error`
 * never reach a listener (`on()` throws for them); an event typed `*`
 * reaches none either, `'*'` included.
 */
export const RESERVED_EVENTS: readonly string[];

/** The longest timer value (2^31 − 1 ms); every wait is clamped to it. */
export const MAX_DELAY_MS: number;
/** The shortest wait before a reconnect (100 ms), so `retry: 0` cannot spin. */
export const MIN_DELAY_MS: number;

/** One event as delivered to the app, in stream order. */
export interface StreamEvent<T = unknown> {
  /** The SSE `event:` name (`message` when the server sent none). */
  type: string;
  /**
   * The stream position after this event: its `id:`, or for an event
   * without one (announcements) the previous id, as `MessageEvent.lastEventId`.
   * Opaque: compare for equality only.
   */
  id: string | null;
  /**
   * The payload as published: with `decode: 'json'` (the default) the JSON
   * text parsed (`"123"` on the wire is the string "123", `123` the number),
   * or the text itself when it is not JSON; with `decode: 'text'` the text.
   */
  data: T;
  /** `data` as received (multi-line data joined with `\n`). */
  raw: string;
  /**
   * Set only when a `decode` function threw for this event: the error (also
   * reported to `onError`); `data` is then the text, as `raw`.
   */
  decodeError?: unknown;
}

/** What `onError` gets when a `decode` function threw (the event itself is still delivered, with `decodeError`). */
export interface DecodeError extends Error {
  reason: 'decode';
  /** The event's id (its position). */
  id: string | null;
  /** The event's type. */
  type: string;
  /** What the decoder threw. */
  cause: unknown;
}

/** The server's `connected` event (always the first of a connection): which instance holds the stream, and its heartbeat interval. */
export type ConnectedEvent = StreamEvent<{ instance_id: string; session_id: string; heartbeat_ms?: number }>;

/**
 * The server's `reset` event: the history no longer reaches the id the
 * client resumed from. `id` is the newest id the history holds (`0-0` when
 * none); `oldest_id` the oldest (`null` when none). Reload your state.
 */
export type ResetEvent = StreamEvent<{ last_event_id: string; oldest_id: string | null; reason?: string }>;

/** A state change. */
export interface StateChange {
  state: ConnectionState;
  /** `Date.now()` when it happened. */
  at: number;
  /** `reconnecting`: milliseconds until the next attempt (`null`: the browser's EventSource decides, after the server's `retry:` hint). */
  delayMs?: number | null;
  /** `reconnecting`: 1 for the first attempt after a failure, growing with the backoff. */
  attempt?: number;
  /** Who reconnects: `'browser'` (EventSource by itself, once, after a healthy stream broke) or `'module'`. */
  by?: 'browser' | 'module';
  /** The HTTP status that caused it (0: network error), when known. */
  status?: number;
  /** The server's `Retry-After`, in milliseconds, when it sent one. */
  retryAfterMs?: number | null;
  /**
   * Why: `'refused'`, `'network'`, `'ended'`, `'idle'` (liveness deadline),
   * `'parse'`, `'token'`, `'probe-unanswered'`,
   * `'not-an-event-stream'`, `'held-overflow'`, `'online'`, `'visible'`,
   * `'closed'` (by `close()`).
   */
  reason?: string;
  /** `reconnecting` after a HEAD probe that something on the way answered 405/501: that status. */
  probeStatus?: number;
  /** `open`: `'eventsource'` or `'fetch'`. */
  transport?: 'eventsource' | 'fetch';
}

export interface BackoffOptions {
  /** First wait after a failure (default 1000 ms). */
  initialMs?: number;
  /** Longest backoff (default 30000 ms); a longer `Retry-After` is still obeyed. */
  maxMs?: number;
  /** Growth per attempt (default 2). */
  factor?: number;
  /** Spread, 0..1 (default 0.3): backoff in [1 - jitter, 1] of itself, a Retry-After wait in [1, 1 + jitter] of it. */
  jitter?: number;
  /** A stream open this long counts as healthy and the backoff starts over (default 5000 ms). */
  stableMs?: number;
}

/** The options of the resync hook's third argument. */
export interface ResyncContext {
  /** Aborted when the stream is closed during the resync; the module runs the hook again on `open()`. */
  signal: AbortSignal;
}

export interface StreamOptions {
  /** The stream URL, e.g. `/sessions/${id}/events` (relative: same origin). */
  url: string;
  /**
   * The session's stream token (`stream_token` from `POST /sessions`), or a
   * function returning the current one (asked on every connect, so a
   * refreshed token is used). EventSource sends it as `?token=`, the fetch
   * transport as `Authorization: Bearer`.
   */
  token?: string | (() => string | Promise<string>);
  /** Resume from this id on the first connect. */
  lastEventId?: string;
  /** Event types to deliver besides `SERVER_EVENTS` and the names passed to `on()` (EventSource needs the names); `heartbeat`, `open`, `error` and `*` throw. */
  events?: string[];
  backoff?: BackoffOptions;
  /**
   * Called after a `reset` was delivered; events that arrive meanwhile are
   * held back and delivered, in order, once the promise settles. Reload the
   * app's state here (e.g. from your API, or with `readHistory`). Pass
   * `signal` on: a `close()` aborts it, and `open()` runs the hook again.
   */
  resync?: (reset: ResetEvent, stream: SseScaleStream | SseScaleFetchStream, context: ResyncContext) => void | Promise<unknown>;
  /** Most events held back during a resync (default 10000); beyond, the connection is dropped and resumed from the last delivered id afterwards. */
  maxHeldEvents?: number;
  /** `false`: do not connect until `open()`. */
  open?: boolean;
  /**
   * How `data` is decoded: `'json'` (default), `'text'`, or a function of
   * the raw text and the type. `connected` and `reset` are always JSON. A
   * function that throws loses no event: it is delivered with its text as
   * `data` and the error as `decodeError`, and the error goes to `onError`
   * (a `DecodeError`).
   */
  decode?: 'json' | 'text' | ((raw: string, type: string) => unknown);
  /**
   * Reconnect when nothing arrived for this long (0: never). Default: two
   * heartbeat intervals (`heartbeat_ms` of `connected`, 15000 until then)
   * plus 5000 ms. On EventSource only once `connected` announced
   * `heartbeat_ms` (a server that sends heartbeats as comments, which
   * EventSource never shows, gets no deadline). It never cuts a wait made
   * on purpose; while EventSource waits out the server's `retry:` hint by
   * itself (which it does not show), it is longer by `backoff.maxMs`.
   */
  idleTimeoutMs?: number;
  /** Longest line the parser accepts, complete or unfinished, however it is chunked (default 1 Mi characters); longer is a parse error (fetch transport and history reads). */
  maxLineLength?: number;
}

export interface FetchStreamOptions extends StreamOptions {
  /** Sent as `X-Session-ID` on every request, for balancers that route on it. */
  sessionId?: string;
  /** Wait before reopening a healthy stream that ended, until the server sends `retry:` (default 2000 ms). */
  retryMs?: number;
}

export interface HistoryRead {
  /** The events after `from`, up to and including `to`, in order. */
  events: StreamEvent[];
  /** `false`: the history no longer reached `from` either; `events` is what followed. */
  complete: boolean;
}

declare class StreamBase {
  /** The id of the last event delivered (what the next reconnect resumes from, unless events are held). */
  readonly lastEventId: string | null;
  readonly state: ConnectionState | null;
  /** The instance holding the stream, from the latest `connected`. */
  readonly instanceId: string | null;
  /** Reconnect attempts so far (browser and module). */
  readonly reconnects: number;
  on(type: 'connected', fn: (ev: ConnectedEvent) => void): () => void;
  on(type: 'reset', fn: (ev: ResetEvent) => void): () => void;
  /**
   * Events of one type; `'*'`: every event of the stream's types
   * (`SERVER_EVENTS`, `events`, and every name passed to `on()`), the same
   * on both transports. `'heartbeat'`, `'open'` and `'error'` throw:
   * heartbeats are never app events, and `open`/`error` are EventSource's
   * own events (use `onState` and `onError`). Returns an unsubscribe
   * function.
   */
  on<T = unknown>(type: string, fn: (ev: StreamEvent<T>) => void): () => void;
  onState(fn: (change: StateChange) => void): () => void;
  /** Errors of listeners, the resync hook, the token function, the parser and `decode` (a `DecodeError`) (default: console.error). */
  onError(fn: (error: unknown) => void): () => void;
  /** Connects (done by the constructor unless `open: false`); after `close()` or a refusal, connects again. */
  open(): this;
  /** Closes the stream; no reconnect and no further event follows (held events are sent again after `open()`). */
  close(): void;
  /**
   * Reads the events after `from` up to and including `to` from the
   * server's history with a short-lived fetch() read (one stream open).
   * If the history dropped `from` meanwhile, reads again after the oldest
   * event it holds (`complete: false`). Rejects with an `AbortError` when
   * `signal` aborts or the stream is closed meanwhile.
   */
  readHistory(range: { from: string | null; to: string | null; timeoutMs?: number; signal?: AbortSignal }): Promise<HistoryRead>;
}

/** The stream over EventSource; the module's backoff (after a HEAD probe) whenever the browser's own reconnect would not do. */
export class SseScaleStream extends StreamBase {
  constructor(options: StreamOptions);
}

/** The stream over fetch(): sends X-Session-ID, Authorization and Last-Event-ID itself. */
export class SseScaleFetchStream extends StreamBase {
  constructor(options: FetchStreamOptions);
}

export function openStream(options: FetchStreamOptions & { transport: 'fetch' }): SseScaleFetchStream;
export function openStream(options: StreamOptions & { transport?: 'eventsource' }): SseScaleStream;

/** `Retry-After` (delay-seconds, digits only, or an HTTP-date) in milliseconds from `now`; `null` when absent or anything else (`1.5`). */
export function parseRetryAfter(value: string | null | undefined, now?: number): number | null;

/** A value setTimeout honours: at least `min` (default `MIN_DELAY_MS`), at most `MAX_DELAY_MS`. */
export function clampDelay(ms: number, min?: number): number;

/** The wait before attempt `attempt` (1-based): jittered exponential backoff, never below `retryAfterMs`, clamped by `clampDelay`. */
export function retryDelay(attempt: number, retryAfterMs?: number | null, backoff?: BackoffOptions, random?: () => number): number;

/**
 * Orders two sse-scale ids (`<ms>-<seq>`): -1, 0 or 1; `null` when either is
 * not of that form. Treat ids as opaque in apps; the module uses this only
 * to bound a history read.
 */
export function compareIds(a: string | null | undefined, b: string | null | undefined): -1 | 0 | 1 | null;

/** A WHATWG `text/event-stream` parser over decoded text. */
export class SseParser {
  constructor(handlers?: {
    onEvent?: (ev: { type: string; data: string; id: string }) => void;
    onRetry?: (ms: number) => void;
    onComment?: (text: string) => void;
    /** Longest line accepted, complete or unfinished (default 1 Mi characters); longer throws, however the input is chunked. */
    maxLineLength?: number;
  });
  /** The last event id seen (persists across events, as in EventSource). */
  lastEventId: string;
  /** Feeds the next chunk of decoded text. */
  feed(text: string): void;
  /** Drops a partial line and block (before reading a new response); keeps `lastEventId`. */
  reset(): void;
}
