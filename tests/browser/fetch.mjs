// Scenario: the fetch() transport (SseScaleFetchStream) behind a balancer
// that routes on the X-Session-ID header (haproxy-header.cfg), which
// EventSource cannot send. The instance holding the stream is killed
// while numbered messages are published; the stream reconnects by itself
// with Last-Event-ID and resumes elsewhere: every message exactly once,
// in order. On the wire every stream request carries X-Session-ID and the
// token as a header, never in the URL.
//
// Protocol: step `connected` {sessionId, token, instance} → cmd `done`
// {messages, killed} → result.

import { run, launch, step, command, check, checkExactly, BASE_URL } from './harness.mjs';

run(async () => {
  const page = await launch();
  const requests = [];
  page.on('request', async (r) => {
    if (!/\/sessions\/[^/]+\/events/.test(r.url())) return;
    requests.push({ url: r.url(), headers: await r.allHeaders().catch(() => ({})) });
  });
  // Any page of the origin will do: the module is imported into it.
  await page.goto(`${BASE_URL}/healthz`);
  const info = await page.evaluate(async () => {
    const mod = await import('/sse-scale.js');
    const res = await fetch('/sessions', { method: 'POST' });
    const session = await res.json();
    window.got = [];
    window.states = [];
    window.instances = [];
    const stream = new mod.SseScaleFetchStream({
      url: `/sessions/${session.id}/events`,
      token: session.stream_token,
      sessionId: session.id,
    });
    stream.onState((s) => window.states.push(s));
    stream.on('connected', (ev) => window.instances.push(ev.data.instance_id));
    stream.on('chat_message', (ev) => window.got.push(ev.data.text));
    window.stream = stream;
    await new Promise((resolve) => {
      const t = setInterval(() => {
        if (window.instances.length) {
          clearInterval(t);
          resolve();
        }
      }, 20);
    });
    return { sessionId: session.id, token: session.token, instance: window.instances[0] };
  });
  step('connected', info);
  const { messages, killed } = await command('done', 60000);

  await page.waitForFunction((n) => window.got.length >= n, messages, { timeout: 20000 });
  await page.waitForTimeout(300);
  const { got, states, instances } = await page.evaluate(() => ({
    got: window.got,
    states: window.states,
    instances: window.instances,
  }));
  await page.evaluate(() => window.stream.close());

  checkExactly(got, Array.from({ length: messages }, (_, i) => `n ${i + 1}`), 'messages');
  check(instances.length >= 2 && instances[0] === killed, 'the stream started on the killed instance and moved', instances);
  check(instances.slice(1).every((i) => i !== killed), 'no reconnect reached the killed instance', instances);
  check(states.some((s) => s.state === 'reconnecting'), 'the stream reconnected', states);
  check(!states.some((s) => s.state === 'closed' && s.reason !== 'closed'), 'the stream never gave up', states);
  check(requests.length >= 2, 'several stream requests', requests.length);
  for (const [i, r] of requests.entries()) {
    check(r.headers['x-session-id'] === info.sessionId, `request ${i} carries X-Session-ID`, r.headers);
    check(/^Bearer s\./.test(r.headers.authorization || ''), `request ${i} carries the stream token as a header`, r.headers);
    check(!/[?&]token=/.test(r.url), `request ${i} has no token in its URL`, r.url);
  }
  check(requests.slice(1).every((r) => r.headers['last-event-id']), 'every reconnect sent Last-Event-ID', requests.map((r) => r.headers['last-event-id'] ?? null));
  return { messages: got.length, instances, requests: requests.length };
});
