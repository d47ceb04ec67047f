// Unit tests of the client module's stream logic (src/js/sse-scale.js)
// under Node's test runner, with fake timers and the fakes of fakes.mjs
// in place of the network: held events across close()/open(), overflow
// inside one chunk, parser errors, the backoff schedule of both
// transports, the liveness deadline, and what reaches the app's listeners.
// Run: node --test tests/js/ (tests/client_js.rs runs it under cargo test).

import { test, mock } from 'node:test';
import assert from 'node:assert/strict';
import * as m from '../../src/js/sse-scale.js';
import { setup, record, flush, sse, eventStream, refuse, FakeEventSource } from './fakes.mjs';

const chat = (text, id) => sse('chat_message', { text }, id);
const connected = (id, extra = {}) => sse('connected', { instance_id: 'app1', session_id: 's', ...extra }, id);
const reset = (id, oldest = '5-0') => sse('reset', { last_event_id: '0-0', oldest_id: oldest }, id);

/** A resync hook the test settles by hand; each run is kept with its signal. */
function manualResync() {
  const runs = [];
  const hook = (ev, stream, opts) =>
    new Promise((resolve, reject) => {
      const run = { resolve, reject, signal: opts?.signal, reset: ev };
      runs.push(run);
      opts?.signal?.addEventListener('abort', () => reject(new DOMException('aborted', 'AbortError')));
    });
  return { runs, hook };
}

/** Events as `type` or the chat text, in delivery order. */
const names = (got) => got.names();

// ------------------------------------------------------------ held events

test('fetch: close() and open() during a resync resume from the reset and deliver the held events once', async (t) => {
  const env = setup(t, (req) => eventStream(req));
  const { runs, hook } = manualResync();
  const s = env.track(new m.SseScaleFetchStream({ url: '/s/events', token: 'tk', lastEventId: '0-0', resync: hook }));
  const got = record(s);
  await flush();
  const [first] = env.server.gets;
  first.body.push(connected('0-0') + reset('15-0'));
  await flush();
  first.body.push(chat('live1', '16-0') + chat('live2', '17-0') + chat('live3', '18-0'));
  await flush();
  assert.deepEqual(names(got), ['connected', 'reset'], 'live events wait for the resync');

  // The page goes into the back/forward cache and comes back.
  s.close();
  s.open();
  await flush();
  assert.equal(first.body.open, false, 'the first response is let go');
  const second = env.server.gets[1];
  assert.equal(second.headers['Last-Event-ID'], '15-0', 'the reopen resumes from the last delivered event');
  assert.equal(runs.length, 2, 'the interrupted resync runs again');
  assert.equal(runs[0].signal?.aborted, true, 'close() aborted the first run');
  second.body.push(connected('15-0') + chat('live1', '16-0') + chat('live2', '17-0') + chat('live3', '18-0') + chat('live4', '19-0'));
  await flush();
  assert.deepEqual(names(got), ['connected', 'reset'], 'still held while the resync runs again');
  runs[1].resolve();
  await flush();
  assert.deepEqual(names(got), ['connected', 'reset', 'connected', 'live1', 'live2', 'live3', 'live4']);
  assert.equal(s.lastEventId, '19-0');
  assert.deepEqual(got.errors, [], 'the aborted run is not reported as an error');
});

test('EventSource: close() and open() during a resync reopen from the reset', async (t) => {
  const env = setup(t, () => {
    throw new TypeError('no HEAD expected');
  });
  const { runs, hook } = manualResync();
  const s = env.track(new m.SseScaleStream({ url: '/s/events', token: 'tk', lastEventId: '0-0', resync: hook }));
  const got = record(s);
  await flush();
  const es1 = FakeEventSource.last;
  es1.open();
  es1.emit('connected', { instance_id: 'app1' }, '0-0');
  es1.emit('reset', { last_event_id: '0-0', oldest_id: '5-0' }, '15-0');
  es1.emit('chat_message', { text: 'live1' }, '16-0');
  es1.emit('chat_message', { text: 'live2' }, '17-0');
  s.close();
  s.open();
  await flush();
  const es2 = FakeEventSource.last;
  assert.notEqual(es2, es1);
  assert.equal(es1.closed, true);
  assert.equal(new URL(es2.url).searchParams.get('last_event_id'), '15-0');
  es2.open();
  es2.emit('connected', { instance_id: 'app2' }, '15-0');
  es2.emit('chat_message', { text: 'live1' }, '16-0');
  es2.emit('chat_message', { text: 'live2' }, '17-0');
  es2.emit('chat_message', { text: 'live3' }, '18-0');
  runs[runs.length - 1].resolve();
  await flush();
  assert.deepEqual(names(got), ['connected', 'reset', 'connected', 'live1', 'live2', 'live3']);
});

test('fetch: overflowing the held events inside one chunk drops the rest of that chunk', async (t) => {
  const env = setup(t, (req) => eventStream(req));
  const { runs, hook } = manualResync();
  const s = env.track(new m.SseScaleFetchStream({ url: '/s/events', lastEventId: '0-0', resync: hook, maxHeldEvents: 2 }));
  const got = record(s);
  await flush();
  const [first] = env.server.gets;
  const six = [1, 2, 3, 4, 5, 6].map((i) => chat(`e${i}`, `${15 + i}-0`)).join('');
  first.body.push(connected('0-0') + reset('15-0') + six);
  await flush();
  assert.equal(first.body.open, false, 'the connection is dropped on overflow');
  assert.equal(env.server.gets.length, 1, 'no reconnect before the resync is done');
  runs[0].resolve();
  await flush();
  const second = env.server.gets[1];
  assert.ok(second, 'reconnects once the resync is done');
  assert.equal(second.headers['Last-Event-ID'], '15-0', 'resumes from the reset, not from an event it dropped');
  second.body.push(connected('15-0') + six);
  await flush();
  assert.deepEqual(names(got), ['connected', 'reset', 'connected', 'e1', 'e2', 'e3', 'e4', 'e5', 'e6']);  assert.ok(got.states.some((c) => c.reason === 'held-overflow'), 'the overflow shows in the state');
});

test('no event reaches the app after close(), held ones included', async (t) => {
  const env = setup(t, (req) => eventStream(req));
  const { runs, hook } = manualResync();
  const s = env.track(new m.SseScaleFetchStream({ url: '/s/events', lastEventId: '0-0', resync: hook }));
  const seen = [];
  s.on('chat_message', (ev) => {
    seen.push(ev.data.text);
    if (ev.data.text === 'e1') s.close();
  });
  await flush();
  const [first] = env.server.gets;
  first.body.push(connected('0-0') + reset('15-0') + chat('e1', '16-0') + chat('e2', '17-0') + chat('e3', '18-0') + chat('e4', '19-0'));
  await flush();
  runs[0].resolve();
  await flush();
  assert.deepEqual(seen, ['e1']);
  assert.equal(s.state, 'closed');
  assert.equal(s.lastEventId, '16-0');

  // And on a live stream: the rest of the chunk goes nowhere.
  const live = env.track(new m.SseScaleFetchStream({ url: '/s/events', lastEventId: '0-0' }));
  const seenLive = [];
  live.on('chat_message', (ev) => {
    seenLive.push(ev.data.text);
    if (ev.data.text === 'e1') {
      live.close();
      live.open();
    }
  });
  await flush();
  env.server.gets[1].body.push(connected('0-0') + chat('e1', '16-0') + chat('e2', '17-0'));
  await flush();
  assert.deepEqual(seenLive, ['e1'], 'the old connection delivers nothing after close()');
  assert.equal(env.server.gets[2].headers['Last-Event-ID'], '16-0');
});

// ------------------------------------------------------------ parser errors

test('fetch: a parser error drops the response, reaches onError and backs off', async (t) => {
  mock.method(Math, 'random', () => 0);
  const env = setup(t, (req) => eventStream(req, connected('0-0') + `data: ${'x'.repeat(200)}`));
  const s = env.track(new m.SseScaleFetchStream({ url: '/s/events', lastEventId: '0-0', maxLineLength: 64 }));
  const got = record(s);
  await flush();
  assert.equal(got.errors.length, 1, 'the parser error reaches onError');
  assert.match(String(got.errors[0]?.message), /longer than 64/);
  assert.equal(env.server.openBodies, 0, 'the response is let go');
  assert.deepEqual(got.waits().map((w) => [w.reason, w.delayMs]), [['parse', 1000]]);
  await env.tick(999);
  assert.equal(env.server.gets.length, 1, 'no reconnect before the backoff');
  await env.tick(1);
  assert.equal(env.server.gets.length, 2);
  await env.tick(2000);
  assert.deepEqual(got.waits().map((w) => w.delayMs), [1000, 2000, 4000], 'the waits grow');
  s.close();
  await flush();
  assert.equal(env.server.openBodies, 0, 'nothing stays open after close()');
});

// ------------------------------------------------------------ backoff

test('fetch: a stream that opens and dies at once backs off; a healthy one waits for the retry hint', async (t) => {
  mock.method(Math, 'random', () => 0);
  let healthy = false;
  const env = setup(t, (req) => {
    const res = eventStream(req, 'retry: 300\n\n' + connected('0-0'));
    if (!healthy) setImmediate(() => req.body.end());
    return res;
  });
  const s = env.track(new m.SseScaleFetchStream({ url: '/s/events' }));
  const got = record(s);
  await flush();
  for (const wait of [1000, 2000, 4000]) await env.tick(wait);
  assert.deepEqual(got.waits().map((w) => w.delayMs), [1000, 2000, 4000, 8000]);
  healthy = true;
  await env.tick(8000);
  await env.tick(5000); // open for stableMs: healthy
  env.server.gets.at(-1).body.end();
  await flush();
  assert.equal(got.waits().at(-1).delayMs, 300, 'after a healthy stream, the server\'s retry hint');
});

test('timer values are bounded: retry: 0, a huge retry: and a huge Retry-After', async (t) => {
  assert.equal(m.retryDelay(1, 1e15, {}, () => 0), 2 ** 31 - 1, 'Retry-After beyond 2^31-1 ms is clamped');
  assert.ok(m.retryDelay(1, null, { initialMs: 0 }, () => 0) >= 100, 'never below the minimum');
  for (const [hint, want] of [['0', 100], ['99999999999', 2 ** 31 - 1]]) {
    const env = setup(t, (req) => eventStream(req, `retry: ${hint}\n\n` + connected('0-0')));
    const s = env.track(new m.SseScaleFetchStream({ url: '/s/events' }));
    const got = record(s);
    await flush();
    await env.tick(5000);
    env.server.gets[0].body.end();
    await flush();
    assert.equal(got.waits().at(-1).delayMs, want, `retry: ${hint}`);
    s.close();
    mock.timers.reset();
  }
});

test('EventSource: a refused connection is retried with the module\'s backoff, not the browser\'s loop', async (t) => {
  mock.method(Math, 'random', () => 0);
  const env = setup(t, async () => {
    throw new TypeError('connection refused');
  });
  const s = env.track(new m.SseScaleStream({ url: '/s/events', token: 'tk' }));
  const got = record(s);
  await flush();
  for (let i = 0; i < 4; i++) {
    const es = FakeEventSource.last;
    es.fail(FakeEventSource.CONNECTING);
    await flush();
    assert.equal(es.closed, true, `EventSource ${i} is closed, not left in its own retry loop`);
    await env.tick(got.waits().at(-1).delayMs);
  }
  assert.deepEqual(got.waits().map((w) => [w.by, w.delayMs, w.status]), [
    ['module', 1000, 0],
    ['module', 2000, 0],
    ['module', 4000, 0],
    ['module', 8000, 0],
  ]);
  assert.equal(env.server.requests.filter((r) => r.method === 'HEAD').length, 4, 'one probe per failure');
  assert.equal(FakeEventSource.instances.length, 5);
});

test('EventSource: a healthy stream\'s break is left to the browser once, then the module takes over', async (t) => {
  mock.method(Math, 'random', () => 0);
  const env = setup(t, async () => refuse(503, { 'Retry-After': '3' }));
  const s = env.track(new m.SseScaleStream({ url: '/s/events', token: 'tk' }));
  const got = record(s);
  await flush();
  const es = FakeEventSource.last;
  es.open();
  es.emit('connected', { instance_id: 'app1', heartbeat_ms: 15000 }, '0-0');
  await env.tick(5000);
  es.fail(FakeEventSource.CONNECTING);
  await flush();
  assert.equal(es.closed, false, 'the browser reconnects by itself after the retry hint');
  assert.deepEqual(got.waits().map((w) => w.by), ['browser']);
  es.fail(FakeEventSource.CONNECTING);
  await flush();
  assert.equal(es.closed, true, 'a second failure: the module takes over');
  assert.deepEqual(got.waits().map((w) => [w.by, w.attempt, w.status]), [['browser', 1, undefined], ['module', 2, 503]]);
  assert.ok(got.waits()[1].delayMs >= 3000, 'never before Retry-After');
});

test('EventSource: a stream that opens and dies at once backs off', async (t) => {
  mock.method(Math, 'random', () => 0);
  const env = setup(t, async () => new Response(null, { status: 200, headers: { 'Content-Type': 'text/event-stream' } }));
  const s = env.track(new m.SseScaleStream({ url: '/s/events', token: 'tk' }));
  const got = record(s);
  await flush();
  for (let i = 0; i < 3; i++) {
    const es = FakeEventSource.last;
    es.open();
    es.emit('connected', { instance_id: 'app1', heartbeat_ms: 15000 }, '0-0');
    await env.tick(100);
    es.fail(FakeEventSource.CONNECTING);
    await flush();
    await env.tick(got.waits().at(-1).delayMs);
  }
  assert.deepEqual(got.waits().map((w) => [w.by, w.delayMs]), [['module', 1000], ['module', 2000], ['module', 4000]]);
});

test('EventSource: a HEAD probe a proxy answers 405 does not close the stream', async (t) => {
  const env = setup(t, async () => refuse(405));
  const s = env.track(new m.SseScaleStream({ url: '/s/events', token: 'tk' }));
  const got = record(s);
  await flush();
  FakeEventSource.last.fail(FakeEventSource.CLOSED); // a 503 EventSource cannot read
  await flush();
  assert.equal(s.state, 'reconnecting');
  assert.equal(got.waits().at(-1).reason, 'probe-unanswered');
});

/** Stands in for `window`'s events (`online`) for one test. */
function windowEvents(t) {
  const target = new EventTarget();
  const saved = { add: globalThis.addEventListener, remove: globalThis.removeEventListener };
  globalThis.addEventListener = target.addEventListener.bind(target);
  globalThis.removeEventListener = target.removeEventListener.bind(target);
  t.after(() => Object.assign(globalThis, { addEventListener: saved.add, removeEventListener: saved.remove }));
  return target;
}

test('online cuts a backoff short, never a Retry-After wait', async (t) => {
  let status = 0;
  const env = setup(t, async (req) => {
    if (status === 0) throw new TypeError('offline');
    return refuse(status, { 'Retry-After': '10' });
  });
  const target = windowEvents(t);
  const s = env.track(new m.SseScaleFetchStream({ url: '/s/events' }));
  const got = record(s);
  await flush();
  assert.equal(env.server.gets.length, 1);
  status = 503;
  target.dispatchEvent(new Event('online'));
  await flush();
  assert.equal(env.server.gets.length, 2, 'online: reconnects at once');
  assert.equal(got.waits().at(-1).retryAfterMs, 10000);
  target.dispatchEvent(new Event('online'));
  await flush();
  assert.equal(env.server.gets.length, 2, 'the server\'s Retry-After is still waited out');
  s.close();
  target.dispatchEvent(new Event('online'));
  await flush();
  assert.equal(env.server.gets.length, 2, 'a closed stream ignores online');
});

test('fetch: online never cuts the wait for the server\'s retry: hint after a healthy stream', async (t) => {
  const env = setup(t, (req) => eventStream(req, 'retry: 20000\n\n' + connected('0-0')));
  const target = windowEvents(t);
  const s = env.track(new m.SseScaleFetchStream({ url: '/s/events' }));
  const got = record(s);
  await flush();
  await env.tick(5000); // open for stableMs: healthy
  env.server.gets[0].body.end();
  await flush();
  assert.deepEqual(got.waits().map((w) => [w.reason, w.delayMs]), [['ended', 20000]]);
  await env.tick(3000);
  target.dispatchEvent(new Event('online'));
  await flush();
  assert.equal(env.server.gets.length, 1, 'the hint spreads reconnects: online does not cut it');
  await env.tick(17000);
  assert.equal(env.server.gets.length, 2);
});

// ------------------------------------------------------------ liveness

test('fetch: a stream silent past two heartbeats and a margin is reconnected; any byte keeps it', async (t) => {
  const env = setup(t, (req) => eventStream(req));
  const s = env.track(new m.SseScaleFetchStream({ url: '/s/events' }));
  const got = record(s);
  await flush();
  const [first] = env.server.gets;
  first.body.push(connected('0-0', { heartbeat_ms: 1000 }));
  await flush();
  await env.tick(6000);
  first.body.push(': heartbeat\n\n');
  await flush();
  await env.tick(6999);
  assert.equal(env.server.gets.length, 1, 'a heartbeat comment is life');
  assert.equal(got.waits().length, 0);
  await env.tick(1);
  assert.deepEqual(got.waits().map((w) => w.reason), ['idle'], 'silent for 2 x 1000 + 5000 ms');
  assert.equal(first.body.open, false);
});

test('EventSource: heartbeat events keep the stream alive, never reach listeners, and silence reconnects', async (t) => {
  const env = setup(t, async () => new Response(null, { status: 200 }));
  const s = env.track(new m.SseScaleStream({ url: '/s/events', token: 'tk' }));
  const got = record(s);
  const direct = [];
  s.on('chat_message', (ev) => direct.push(ev));
  await flush();
  const es = FakeEventSource.last;
  assert.equal(new URL(es.url).searchParams.get('heartbeat'), 'event', 'asks for heartbeats as events');
  es.open();
  es.emit('connected', { instance_id: 'app1', heartbeat_ms: 1000 }, '0-0');
  for (let i = 0; i < 5; i++) {
    await env.tick(6000);
    es.emit('heartbeat', '');
  }
  assert.equal(es.closed, false);
  assert.deepEqual(names(got), ['connected'], 'heartbeats are not app events');
  await env.tick(7000);
  assert.equal(es.closed, true, 'silent past the deadline: reconnected');
  assert.equal(got.waits().at(-1).reason, 'idle');
  assert.throws(() => s.on('heartbeat', () => {}), TypeError);
});

test('EventSource: no liveness deadline once a server without event heartbeats connected', async (t) => {
  const env = setup(t, async () => new Response(null, { status: 200 }));
  const s = env.track(new m.SseScaleStream({ url: '/s/events', token: 'tk' }));
  await flush();
  const es = FakeEventSource.last;
  es.open();
  es.emit('connected', { instance_id: 'app1' }, '0-0');
  await env.tick(600000);
  assert.equal(es.closed, false, 'its comment heartbeats are invisible to EventSource');
  assert.equal(s.state, 'open');
});

// ------------------------------------------------------------ what listeners see

test("'*' covers the same events on both transports", async (t) => {
  const env = setup(t, (req) => eventStream(req));
  const f = env.track(new m.SseScaleFetchStream({ url: '/s/events', events: ['extra'] }));
  const fgot = record(f);
  await flush();
  env.server.gets[0].body.push(connected('0-0') + sse('unknown', 1, '1-0') + sse('extra', 2, '2-0') + sse('heartbeat', '') + chat('c', '3-0'));
  await flush();
  assert.deepEqual(names(fgot), ['connected', 'extra', 'c']);
  assert.equal(f.lastEventId, '3-0');

  const e = env.track(new m.SseScaleStream({ url: '/s/events', events: ['extra'] }));
  const egot = record(e);
  await flush();
  const es = FakeEventSource.last;
  es.open();
  for (const [type, data, id] of [['connected', { instance_id: 'a' }, '0-0'], ['unknown', 1, '1-0'], ['extra', 2, '2-0'], ['heartbeat', ''], ['chat_message', { text: 'c' }, '3-0']]) {
    es.emit(type, data, id);
  }
  assert.deepEqual(names(egot), names(fgot));
});

test('data keeps the type the publisher sent', async (t) => {
  const env = setup(t, (req) => eventStream(req));
  const wire = connected('0-0') + 'id: 1-0\nevent: note\ndata: "123"\n\n' + 'id: 2-0\nevent: note\ndata: 123\n\n'
    + 'id: 3-0\nevent: note\ndata: {"a":[1,"2"]}\n\n' + 'id: 4-0\nevent: note\ndata: not json\n\n';
  const json = env.track(new m.SseScaleFetchStream({ url: '/s/events', events: ['note'] }));
  const text = env.track(new m.SseScaleFetchStream({ url: '/s/events', events: ['note'], decode: 'text' }));
  const a = [];
  const b = [];
  json.on('note', (ev) => a.push(ev.data));
  text.on('note', (ev) => b.push(ev.data));
  await flush();
  for (const r of env.server.gets) r.body.push(wire);
  await flush();
  assert.deepEqual(a, ['123', 123, { a: [1, '2'] }, 'not json']);
  assert.deepEqual(b, ['"123"', '123', '{"a":[1,"2"]}', 'not json'], "decode: 'text' hands over the raw text");
  assert.equal(text.instanceId, 'app1', 'protocol events are always JSON');
});

test('a `connected` in the middle of a stream is not the server\'s: ignored and reported', async (t) => {
  const env = setup(t, (req) => eventStream(req));
  const s = env.track(new m.SseScaleFetchStream({ url: '/s/events' }));
  const got = record(s);
  await flush();
  env.server.gets[0].body.push(connected('0-0') + chat('a', '1-0') + sse('connected', { instance_id: 'evil', heartbeat_ms: 1 }, '2-0') + chat('b', '3-0'));
  await flush();
  assert.deepEqual(names(got), ['connected', 'a', 'b']);
  assert.equal(s.instanceId, 'app1');
  assert.equal(got.errors.length, 1);
  assert.equal(s.lastEventId, '3-0');
});

test('errors of the token function reach onError and the stream backs off', async (t) => {
  mock.method(Math, 'random', () => 0);
  const env = setup(t, (req) => eventStream(req));
  let fail = true;
  const token = () => {
    if (fail) throw new Error('no token');
    return 'tk';
  };
  const f = env.track(new m.SseScaleFetchStream({ url: '/s/events', token }));
  const e = env.track(new m.SseScaleStream({ url: '/s/events', token }));
  const fgot = record(f);
  const egot = record(e);
  await flush();
  for (const got of [fgot, egot]) {
    assert.deepEqual(got.errors.map((x) => x.message), ['no token']);
    assert.deepEqual(got.waits().map((w) => [w.reason, w.delayMs]), [['token', 1000]]);
  }
  fail = false;
  await env.tick(1000);
  assert.equal(env.server.gets[0].headers.Authorization, 'Bearer tk');
  assert.equal(new URL(FakeEventSource.last.url).searchParams.get('token'), 'tk');
});

// ------------------------------------------------------------ history reads

test('readHistory honours an aborted signal and close()', async (t) => {
  const env = setup(t, (req) => eventStream(req, connected('5-0')));
  const s = env.track(new m.SseScaleFetchStream({ url: '/s/events', open: false }));
  const ctrl = new AbortController();
  ctrl.abort();
  await assert.rejects(s.readHistory({ from: '5-0', to: '9-0', signal: ctrl.signal }), { name: 'AbortError' });
  assert.equal(env.server.requests.length, 0, 'an aborted read asks nothing');

  s.open();
  await flush();
  const read = s.readHistory({ from: '5-0', to: '9-0' });
  await flush();
  const history = env.server.gets[1];
  history.body.push(chat('h6', '6-0'));
  s.close();
  await assert.rejects(read, { name: 'AbortError' });
  await flush();
  assert.equal(env.server.openBodies, 0, 'close() lets the history read go');
});

// ------------------------------------------------------------ attack 33

/** Ten numbered chat events after a reset: `n1`..`n10`, ids 16-0..25-0. */
const ten = () => Array.from({ length: 10 }, (_, i) => [`n${i + 1}`, `${16 + i}-0`]);

for (const transport of ['fetch', 'eventsource']) {
  test(`${transport}: close(); open() in a listener while held events are delivered: each event once, in order`, async (t) => {
    const env = setup(t, (req) => eventStream(req));
    const { runs, hook } = manualResync();
    const Cls = transport === 'fetch' ? m.SseScaleFetchStream : m.SseScaleStream;
    const s = env.track(new Cls({ url: '/s/events', token: 'tk', lastEventId: '1-0', resync: hook }));
    const got = record(s);
    let reopened = false;
    s.on('chat_message', (ev) => {
      if (!reopened && ev.data.text === 'n3') {
        reopened = true;
        s.close();
        s.open();
      }
    });
    await flush();
    if (transport === 'fetch') {
      env.server.gets[0].body.push(connected('1-0') + reset('15-0') + ten().map(([x, id]) => chat(x, id)).join(''));
    } else {
      const es = FakeEventSource.last;
      es.open();
      es.emit('connected', { instance_id: 'app1' }, '1-0');
      es.emit('reset', { last_event_id: '1-0', oldest_id: '5-0' }, '15-0');
      for (const [x, id] of ten()) es.emit('chat_message', { text: x }, id);
    }
    await flush();
    assert.deepEqual(names(got), ['connected', 'reset'], 'held while the resync runs');
    runs[0].resolve();
    await flush();
    assert.equal(s.lastEventId, '18-0', 'the delivery of the old batch stopped at the listener\'s close()');
    // The new connection resumes from the last delivered event and replays the rest.
    const rest = ten().slice(3);
    if (transport === 'fetch') {
      const second = env.server.gets[1];
      assert.equal(second.headers['Last-Event-ID'], '18-0');
      second.body.push(connected('18-0') + rest.map(([x, id]) => chat(x, id)).join(''));
    } else {
      const es2 = FakeEventSource.last;
      assert.equal(new URL(es2.url).searchParams.get('last_event_id'), '18-0');
      es2.open();
      es2.emit('connected', { instance_id: 'app1' }, '18-0');
      for (const [x, id] of rest) es2.emit('chat_message', { text: x }, id);
    }
    await flush();
    assert.deepEqual(names(got), ['connected', 'reset', 'n1', 'n2', 'n3', 'connected', ...ten().slice(3).map(([x]) => x)]);
    assert.equal(s.lastEventId, '25-0');
  });
}

test('on() and `events` refuse the names EventSource and the module give their own meaning', async (t) => {
  const env = setup(t, (req) => eventStream(req));
  const s = env.track(new m.SseScaleFetchStream({ url: '/s/events', open: false }));
  for (const name of ['heartbeat', 'error', 'open']) {
    assert.throws(() => s.on(name, () => {}), TypeError, `on('${name}')`);
    assert.throws(() => new m.SseScaleFetchStream({ url: '/s/events', open: false, events: [name] }), TypeError, `events: ['${name}']`);
  }
  assert.throws(() => new m.SseScaleStream({ url: '/s/events', open: false, events: ['*'] }), TypeError, "events: ['*']");
  for (const name of ['error', 'open', '*']) assert.ok(m.RESERVED_EVENTS.includes(name), `RESERVED_EVENTS has ${name}`);
  assert.equal(env.server.requests.length, 0);
});

test("EventSource: a server event named `error` or `open` is not taken for the browser's own", async (t) => {
  const env = setup(t, () => {
    throw new TypeError('no HEAD expected');
  });
  const s = env.track(new m.SseScaleStream({ url: '/s/events', token: 'tk' }));
  const got = record(s);
  await flush();
  const es = FakeEventSource.last;
  es.open();
  es.emit('connected', { instance_id: 'app1', heartbeat_ms: 15000 }, '0-0');
  await env.tick(6000);
  es.emit('error', { t: 'error' }, '1-0');
  es.emit('open', { t: 'open' }, '2-0');
  es.emit('chat_message', { text: 'after' }, '3-0');
  await flush();
  assert.equal(es.closed, false, 'no reconnect');
  assert.deepEqual(got.states.map((c) => c.state), ['open'], 'no second `open`, no `reconnecting`');
  assert.deepEqual(names(got), ['connected', 'after']);
  assert.equal(s.lastEventId, '3-0');
  // The browser's own events still work.
  es.fail(FakeEventSource.CONNECTING);
  await flush();
  assert.deepEqual(got.waits().map((w) => w.by), ['browser']);
});

test("'*' never delivers an event whose type is `*`, `error` or `open`, on either transport", async (t) => {
  const env = setup(t, (req) => eventStream(req));
  const f = env.track(new m.SseScaleFetchStream({ url: '/s/events' }));
  const fgot = record(f);
  await flush();
  const wire = [['connected', { instance_id: 'a' }, '0-0'], ['*', { t: 1 }, '1-0'], ['error', { t: 2 }, '2-0'], ['open', { t: 3 }, '3-0'], ['chat_message', { text: 'c' }, '4-0']];
  env.server.gets[0].body.push(wire.map(([type, data, id]) => sse(type, data, id)).join(''));
  await flush();
  assert.deepEqual(names(fgot), ['connected', 'c']);
  assert.equal(f.lastEventId, '4-0');

  const e = env.track(new m.SseScaleStream({ url: '/s/events' }));
  const egot = record(e);
  await flush();
  const es = FakeEventSource.last;
  es.open();
  for (const [type, data, id] of wire) es.emit(type, data, id);
  assert.deepEqual(names(egot), names(fgot));
  assert.equal(e.lastEventId, '4-0');
  assert.equal(es.closed, false);
});

for (const transport of ['fetch', 'eventsource']) {
  test(`${transport}: a decode function that throws: the event counts, reaches listeners undecoded and onError, no reconnect`, async (t) => {
    const env = setup(t, (req) => eventStream(req));
    const decode = (raw) => {
      const v = JSON.parse(raw);
      if (v.boom) throw new Error('boom');
      return v;
    };
    const Cls = transport === 'fetch' ? m.SseScaleFetchStream : m.SseScaleStream;
    const s = env.track(new Cls({ url: '/s/events', token: 'tk', decode }));
    const got = record(s);
    await flush();
    const wire = [['connected', { instance_id: 'a', heartbeat_ms: 15000 }, '0-0'], ['chat_message', { text: 'n1' }, '1-0'],
      ['chat_message', { text: 'n2', boom: true }, '2-0'], ['chat_message', { text: 'n3' }, '3-0']];
    if (transport === 'fetch') {
      env.server.gets[0].body.push(wire.map(([type, data, id]) => sse(type, data, id)).join(''));
    } else {
      const es = FakeEventSource.last;
      es.open();
      for (const [type, data, id] of wire) es.emit(type, data, id);
    }
    await flush();
    const chats = got.events.filter((e) => e.type === 'chat_message');
    assert.deepEqual(chats.map((e) => e.id), ['1-0', '2-0', '3-0'], 'every event once, in order');
    assert.equal(chats[1].data, '{"text":"n2","boom":true}', 'the undecodable event comes with its raw text as data');
    assert.equal(chats[1].decodeError?.message, 'boom');
    assert.equal(chats[0].decodeError, undefined);
    assert.equal(got.errors.length, 1, 'reported once');
    assert.deepEqual([got.errors[0].reason, got.errors[0].id, got.errors[0].type], ['decode', '2-0', 'chat_message']);
    assert.equal(got.errors[0].cause?.message, 'boom');
    assert.equal(s.lastEventId, '3-0');
    assert.deepEqual(got.waits(), [], 'no reconnect');
    assert.equal(s.state, 'open');
  });
}

test('EventSource: the liveness deadline does not cut the browser\'s wait for a long retry: hint', async (t) => {
  mock.method(Math, 'random', () => 0);
  const env = setup(t, async () => refuse(503));
  const s = env.track(new m.SseScaleStream({ url: '/s/events', token: 'tk' }));
  const got = record(s);
  await flush();
  const es = FakeEventSource.last;
  es.open();
  es.emit('connected', { instance_id: 'app1', heartbeat_ms: 1000 }, '0-0'); // liveness: 7 s
  await env.tick(5000);
  es.emit('heartbeat', '');
  es.fail(FakeEventSource.CONNECTING); // the browser waits the server's hint (say 20-30 s)
  await flush();
  await env.tick(30000);
  assert.equal(es.closed, false, 'the browser is still left to wait out the hint');
  assert.deepEqual(got.waits().map((w) => w.by), ['browser']);
  es.open();
  es.emit('connected', { instance_id: 'app2', heartbeat_ms: 1000 }, '0-0');
  assert.equal(s.state, 'open');
  await env.tick(7000);
  assert.equal(es.closed, true, 'once open again, silence is bounded as before');
  assert.equal(got.waits().at(-1).reason, 'idle');
});

test('EventSource: a browser reconnect that never answers is still bounded', async (t) => {
  mock.method(Math, 'random', () => 0);
  const env = setup(t, async () => refuse(503));
  const s = env.track(new m.SseScaleStream({ url: '/s/events', token: 'tk' }));
  const got = record(s);
  await flush();
  const es = FakeEventSource.last;
  es.open();
  es.emit('connected', { instance_id: 'app1', heartbeat_ms: 1000 }, '0-0');
  await env.tick(5000);
  es.fail(FakeEventSource.CONNECTING);
  await flush();
  await env.tick(30000 + 7000); // backoff.maxMs + the liveness deadline
  assert.equal(es.closed, true);
  assert.equal(got.waits().at(-1).reason, 'idle');
});

test('fetch: the liveness deadline does not run during the wait for a long retry: hint', async (t) => {
  const env = setup(t, (req) => eventStream(req, 'retry: 20000\n\n' + connected('0-0', { heartbeat_ms: 1000 })));
  const s = env.track(new m.SseScaleFetchStream({ url: '/s/events' }));
  const got = record(s);
  await flush();
  await env.tick(5000);
  env.server.gets[0].body.end();
  await flush();
  assert.deepEqual(got.waits().map((w) => [w.reason, w.delayMs]), [['ended', 20000]]);
  await env.tick(19999);
  assert.equal(env.server.gets.length, 1);
  assert.equal(got.waits().length, 1, 'no idle timeout while waiting');
  await env.tick(1);
  assert.equal(env.server.gets.length, 2);
});

test('maxLineLength holds for a complete line as for an unfinished one, whatever the chunking', () => {
  const text = `id: 1-0\nevent: a\ndata: short\n\nid: 2-0\nevent: a\ndata: ${'x'.repeat(100)}\n\nid: 3-0\nevent: a\ndata: after\n\n`;
  const run = (chunks) => {
    const events = [];
    const p = new m.SseParser({ maxLineLength: 64, onEvent: (e) => events.push(e.id) });
    let error = null;
    try {
      for (const c of chunks) p.feed(c);
    } catch (e) {
      error = e.message;
    }
    return { events, error };
  };
  const whole = run([text]);
  assert.deepEqual(whole, { events: ['1-0'], error: 'event stream line longer than 64 characters' });
  const pieces = [];
  for (let i = 0; i < text.length; i += 10) pieces.push(text.slice(i, i + 10));
  assert.deepEqual(run(pieces), whole, 'in pieces');
  assert.deepEqual(run([...text]), whole, 'char by char');
  // A line of exactly the limit passes both ways.
  const ok = `data: ${'x'.repeat(58)}\n\n`;
  assert.deepEqual(run([ok]).error, null);
  assert.deepEqual(run([...ok]).error, null);
});

test('Retry-After: delta-seconds are digits only; anything else must be an HTTP-date', () => {
  const now = Date.UTC(1994, 10, 6, 8, 49, 30);
  assert.equal(m.parseRetryAfter('1.5', now), null, 'not delta-seconds, not a date');
  assert.equal(m.parseRetryAfter('-1', now), null);
  assert.equal(m.parseRetryAfter('+3', now), null);
  assert.equal(m.parseRetryAfter('1e3', now), null);
  assert.equal(m.parseRetryAfter('2024', now), 2024000, 'digits are seconds');
  assert.equal(m.parseRetryAfter('12/25/2030', now), null, 'a date JavaScript reads but HTTP does not');
  assert.equal(m.parseRetryAfter('Tomorrow', now), null);
  assert.equal(m.parseRetryAfter('Sun, 06 Nov 1994 08:49:37 GMT', now), 7000, 'IMF-fixdate');
  assert.equal(m.parseRetryAfter('Sunday, 06-Nov-94 08:49:37 GMT', now), 7000, 'obsolete RFC 850 date');
  assert.equal(m.parseRetryAfter('Sun Nov  6 08:49:37 1994', now), 7000, 'asctime date (GMT)');
  assert.equal(m.parseRetryAfter('Sun, 06 Nov 1994 08:49:00 GMT', now), 0, 'a date in the past: now');
  assert.equal(m.parseRetryAfter('Sun, 31 Nov 1994 08:49:37 GMT', now), null, 'no such day');
  assert.equal(m.parseRetryAfter('Sun, 06 Nov 1994 08:49:37 +0100', now), null, 'HTTP-dates are GMT');
});
