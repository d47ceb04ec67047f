// Scenario: what Chromium's own EventSource does with what a stream sends,
// against the module, on both transports side by side. The origin is this
// script's own (a small node server serving the module and scripted event
// streams), since the reference server refuses the event types in question
// since they are reserved — a server outside that contract, or an older
// one, may still send them.
//
// 1. Event types EventSource gives its own meaning: a server's
//    `event: error` reaches `onerror` and `event: open` reaches `onopen` (as
//    MessageEvents). The module must take them for events of the stream (no
//    listener gets them, the position moves), not for a failed or a new
//    connection: no reconnect, no second `open`. An event typed `*` reaches
//    no listener, `'*'` included, on either transport. A `decode` function
//    that throws for one event: the event still reaches the listeners (its
//    text as `data`, `decodeError` set), the error reaches `onError`, no
//    reconnect, no uncaught page error.
// 2. A `retry:` hint longer than the liveness deadline: after a healthy
//    stream ends, the browser (EventSource) or the module (fetch) waits out
//    the hint; the liveness deadline must not cut that wait.

import { createServer } from 'node:http';
import { readFileSync } from 'node:fs';
import { run, launch, step, check } from './harness.mjs';

const MODULE = readFileSync(new URL('../../src/js/sse-scale.js', import.meta.url));
const HINT_MS = 8000;

const requests = [];
const server = createServer((req, res) => {
  const url = new URL(req.url, 'http://origin');
  if (url.pathname === '/') {
    res.writeHead(200, { 'Content-Type': 'text/html' });
    res.end('<!doctype html><title>native</title>');
    return;
  }
  if (url.pathname === '/sse-scale.js') {
    res.writeHead(200, { 'Content-Type': 'text/javascript' });
    res.end(MODULE);
    return;
  }
  const m = /^\/(names|hint)\/(eventsource|fetch)\/events$/.exec(url.pathname);
  if (!m) {
    res.writeHead(404).end();
    return;
  }
  const [, kind, transport] = m;
  requests.push({ kind, transport, method: req.method, at: Date.now() });
  res.writeHead(200, { 'Content-Type': 'text/event-stream', 'Cache-Control': 'no-store' });
  if (req.method === 'HEAD') {
    res.end();
    return;
  }
  const ev = (type, data, id) => `${id ? `id: ${id}\n` : ''}event: ${type}\ndata: ${JSON.stringify(data)}\n\n`;
  const heartbeat = 'event: heartbeat\ndata:\n\n';
  if (kind === 'names') {
    res.write('retry: 500\n\n' + ev('connected', { instance_id: 'native', heartbeat_ms: 15000 }, '0-0'));
    res.write(ev('error', { t: 'error' }, '1-0') + ev('open', { t: 'open' }, '2-0') + ev('*', { t: '*' }, '3-0'));
    res.write(ev('chat_message', { text: 'c' }, '4-0') + ev('chat_message', { boom: true }, '5-0') + ev('chat_message', { text: 'd' }, '6-0'));
    const timer = setInterval(() => res.write(heartbeat), 1000);
    req.on('close', () => clearInterval(timer));
    return;
  }
  // hint: heartbeats every 400 ms (liveness 2 × 500 + 5000 = 6 s), a
  // retry: hint longer than that, and the first stream ends once healthy.
  const first = requests.filter((r) => r.kind === 'hint' && r.transport === transport && r.method === 'GET').length === 1;
  res.write(`retry: ${HINT_MS}\n\n` + ev('connected', { instance_id: 'native', heartbeat_ms: 500 }, '0-0'));
  const timer = setInterval(() => res.write(heartbeat), 400);
  req.on('close', () => clearInterval(timer));
  if (first) {
    setTimeout(() => {
      clearInterval(timer);
      requests.push({ kind, transport, method: 'END', at: Date.now() });
      res.end();
    }, 6000);
  }
});

run(async () => {
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const base = `http://127.0.0.1:${server.address().port}`;
  const page = await launch();
  await page.goto(`${base}/`);
  step('page', { base });
  await page.evaluate(async () => {
    const M = await import('/sse-scale.js');
    window.got = {};
    for (const kind of ['names', 'hint']) {
      for (const transport of ['eventsource', 'fetch']) {
        const Cls = transport === 'fetch' ? M.SseScaleFetchStream : M.SseScaleStream;
        const r = (window.got[`${kind}/${transport}`] = { events: [], states: [], errors: [], threw: [] });
        const s = new Cls({
          url: `/${kind}/${transport}/events`,
          token: 'tk',
          open: false,
          decode: (raw) => {
            const v = JSON.parse(raw);
            if (v && v.boom) throw new Error('boom');
            return v;
          },
        });
        r.stream = s;
        s.on('*', (ev) => r.events.push({ type: ev.type, id: ev.id, text: ev.data?.text ?? null, decodeError: ev.decodeError?.message ?? null }));
        s.onState((c) => r.states.push({ state: c.state, by: c.by ?? null, reason: c.reason ?? null, at: c.at }));
        s.onError((e) => r.errors.push({ message: e.message, reason: e.reason ?? null, id: e.id ?? null, type: e.type ?? null }));
        for (const name of kind === 'names' ? ['error', 'open'] : []) {
          try {
            s.on(name, () => {});
          } catch (e) {
            r.threw.push(name);
          }
        }
        s.open();
      }
    }
  });

  await new Promise((resolve) => setTimeout(resolve, 18000));
  const got = await page.evaluate(() => {
    const out = {};
    for (const [k, r] of Object.entries(window.got)) {
      out[k] = JSON.parse(JSON.stringify({ ...r, stream: undefined, lastEventId: r.stream.lastEventId, state: r.stream.state }));
    }
    for (const r of Object.values(window.got)) r.stream.close();
    return out;
  });

  const wanted = [
    { type: 'connected', id: '0-0', text: null, decodeError: null },
    { type: 'chat_message', id: '4-0', text: 'c', decodeError: null },
    { type: 'chat_message', id: '5-0', text: null, decodeError: 'boom' },
    { type: 'chat_message', id: '6-0', text: 'd', decodeError: null },
  ];
  for (const transport of ['eventsource', 'fetch']) {
    const r = got[`names/${transport}`];
    const reqs = requests.filter((q) => q.kind === 'names' && q.transport === transport);
    check(reqs.length === 1 && reqs[0].method === 'GET', `${transport}: one stream request, no reconnect, no probe`, reqs.map((q) => q.method));
    check(JSON.stringify(r.states.map((c) => c.state)) === '["connecting","open"]', `${transport}: open once, never reconnecting`, r.states);
    check(JSON.stringify(r.events) === JSON.stringify(wanted), `${transport}: '*' gets the stream's types only, every one once, in order`, r.events);
    check(r.lastEventId === '6-0', `${transport}: the position moved past every event`, r.lastEventId);
    check(r.errors.length === 1 && r.errors[0].reason === 'decode' && r.errors[0].id === '5-0' && r.errors[0].type === 'chat_message',
      `${transport}: the decode error reaches onError once, with the event's id and type`, r.errors);
    check(JSON.stringify(r.threw) === '["error","open"]', `${transport}: on('error') and on('open') throw`, r.threw);
  }
  check(JSON.stringify(got['names/eventsource'].events) === JSON.stringify(got['names/fetch'].events), 'both transports deliver the same');

  for (const transport of ['eventsource', 'fetch']) {
    const r = got[`hint/${transport}`];
    const reqs = requests.filter((q) => q.kind === 'hint' && q.transport === transport);
    const end = reqs.find((q) => q.method === 'END');
    const next = reqs.filter((q) => q.method !== 'END').slice(1);
    check(Boolean(end), `${transport}: the first stream ended`, reqs);
    check(next.length >= 1 && next[0].method === 'GET', `${transport}: reconnected with a GET, no probe`, next.map((q) => q.method));
    if (end && next.length) {
      const waited = next[0].at - end.at;
      check(waited >= HINT_MS - 250, `${transport}: the reconnect waited out the ${HINT_MS} ms retry: hint`, { waited });
    }
    check(!r.states.some((c) => c.reason === 'idle'), `${transport}: no liveness timeout while waiting`, r.states);
    check(r.state === 'open', `${transport}: open again`, r.states);
  }
  server.close();
  return { requests: requests.length, got };
});
