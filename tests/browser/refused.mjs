// Scenario: the page's reconnect is refused — 503 (the instance holds
// MAX_STREAMS) or 429 (the client address used up
// RATE_LIMIT_STREAMS_PER_MIN) — with a Retry-After. The page had a stream
// and events; its connection is cut (the Rust side's cable), and while it
// is away the server starts refusing and more messages are published.
// EventSource gives up on the refusal; the module must find out the delay
// (one HEAD probe), wait at least that long, reconnect with
// `?last_event_id=`, and get every message it missed exactly once.
//
// The timing is checked on the wire (Playwright's view of every request to
// the stream URL), not on what the page says about itself: no GET may
// leave before the Retry-After of the latest refusal has passed.
//
// Protocol: step `connected` → cmd `before` {count} → step `seen` → cmd
// `refusing` {during} (cut, refusing, published, cable back) → step
// `refused` → cmd `released` (503: the slot is free again; 429: the window
// ends by itself) → result.
//
// Env: MODE (503 or 429).

import {
  run, launch, openDemo, step, command, check, until, readPage, recordStreamRequests, checkExactly,
} from './harness.mjs';

const MODE = Number(process.env.MODE || 503);
// The times are the browser's (see recordStreamRequests); the slack covers
// the gap between the answer's head arriving and the page's code seeing it.
const SLACK_MS = 50;

run(async () => {
  const page = await launch();
  const wire = recordStreamRequests(page);
  const info = await openDemo(page);
  step('connected', info);
  const chats = (s) => s.feed.filter((f) => f.kind === 'chat').map((f) => f.text);

  const { count: before } = await command('before');
  await until(page, (s) => chats(s).length >= before, 'the messages before the cut');
  step('seen');
  const cutAt = wire.length;

  const { during } = await command('refusing', 60000);
  let state = await until(
    page,
    (s) => s.log.some((l) => l.state === 'reconnecting' && l.by === 'module' && l.status === MODE),
    `a ${MODE} refusal`,
  );
  step('refused');
  await command('released');

  state = await until(page, (s) => s.state === 'open' && chats(s).length >= before + during, 'the missed messages', 30000);
  // The stream works: a message sent now shows once.
  await page.fill('#chat-text', 'back again');
  await page.click('#chat-send');
  state = await until(page, (s) => chats(s).includes('back again'), 'the chat message');
  await page.waitForTimeout(300);
  state = await readPage(page);

  const want = [
    ...Array.from({ length: before }, (_, i) => `before ${i + 1}`),
    ...Array.from({ length: during }, (_, i) => `during ${i + 1}`),
    'back again',
  ];
  checkExactly(chats(state), want, 'chat messages');

  // On the wire, from the cut on: refusals, probes, retries.
  const after = wire.slice(cutAt);
  const responses = after.filter((w) => w.kind === 'response');
  const refusals = responses.filter((r) => r.status === MODE);
  const gets = after.filter((w) => w.kind === 'request' && w.method === 'GET');
  const heads = after.filter((w) => w.kind === 'request' && w.method === 'HEAD');
  // The probe's answer at least; the EventSource's own GET is refused too
  // when the browser retried by itself first (a stream that had been open
  // for a while), not when the module took over at once.
  check(refusals.some((r) => r.method === 'HEAD'), `the probe was refused with ${MODE}`, refusals);
  check(refusals.every((r) => r.retryAfter !== null), 'every refusal carried Retry-After', refusals);
  // An EventSource fails with a refusal, with no answer at all (while the
  // cable is cut), or by the cut of the stream that was open (one more);
  // the module probes once before each of its waits.
  const failedGets = responses.filter((r) => r.method === 'GET' && r.status !== 200).length
    + after.filter((w) => w.kind === 'failed' && w.method === 'GET').length;
  check(heads.length >= 1 && heads.length <= failedGets + 1, 'one probe per failed EventSource', { heads: heads.length, failedGets });
  const last = gets[gets.length - 1];
  check(last && /[?&]last_event_id=/.test(last.url), 'the module reconnected with ?last_event_id=', last?.url);

  // In the order node saw them (a response and the next request may share
  // a millisecond): each GET against the latest refusal seen before it.
  const early = [];
  const measured = [];
  let latest = null;
  for (const w of after) {
    if (w.kind === 'response' && (w.status === 429 || w.status === 503)) latest = w;
    if (w.kind !== 'request' || w.method !== 'GET' || !latest || latest.retryAfter === null) continue;
    const waited = w.at - latest.at;
    const asked = Number(latest.retryAfter) * 1000;
    measured.push({ waited, asked });
    if (waited < asked - SLACK_MS) early.push({ waited, asked });
  }
  check(early.length === 0, 'no GET before the Retry-After of the refusal before it', early);

  // The module's waits after a refusal (those while the cable was cut had
  // no answer, so no Retry-After).
  const waits = state.log.filter((l) => l.state === 'reconnecting' && l.by === 'module' && l.status === MODE);
  check(
    waits.length >= 1 && waits.every((l) => l.retryAfter !== null && l.delay >= l.retryAfter),
    'every announced delay after a refusal is at least the Retry-After',
    waits.map((l) => [l.delay, l.retryAfter]),
  );
  check(state.state === 'open', 'the stream is open at the end', state.state);
  check(state.stateCounts.closed === 0, 'the page never gave up', state.stateCounts);
  return {
    refusals: refusals.map((r) => ({ method: r.method, retryAfter: r.retryAfter })),
    gets: gets.length,
    heads: heads.length,
    waits: waits.map((l) => ({ delay: l.delay, retryAfter: l.retryAfter })),
    measured,
    messages: chats(state).length,
  };
});
