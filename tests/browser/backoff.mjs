// Scenario: the server becomes unreachable under a page on the EventSource
// transport. The page's stream has been up for a while; then the network
// to the server goes (the Rust side's cable: open connections dropped, new
// ones closed at once) for several seconds. EventSource alone would retry
// in its own fixed loop after the server's `retry:` hint, forever; the
// module must allow the browser that one retry, then close the EventSource
// and reconnect on its own jittered, growing backoff, and report it. Once
// the network is back, every message published meanwhile shows once.
//
// Checked both on what the page reports (the module's waits: by whom,
// attempt, delay within the jitter window) and on the wire (the GETs
// while the server was away are spaced by at least the announced waits).
//
// Protocol: step `connected` → cmd `before` {count} → step `stable` (open
// longer than the module's stableMs) → cmd `cut` → step `observed` → cmd
// `plugged` {during} → result.

import {
  run, launch, openDemo, step, command, check, until, readPage, recordStreamRequests, checkExactly,
} from './harness.mjs';

const STABLE_MS = 5000; // the module's default backoff.stableMs
const CUT_MS = 10000;
const SLACK_MS = 50;

run(async () => {
  const page = await launch();
  const wire = recordStreamRequests(page);
  const info = await openDemo(page);
  const openedAt = Date.now();
  step('connected', info);
  const chats = (s) => s.feed.filter((f) => f.kind === 'chat').map((f) => f.text);

  const { count: before } = await command('before');
  await until(page, (s) => chats(s).length >= before, 'the messages before the cut');
  await page.waitForTimeout(Math.max(0, STABLE_MS + 500 - (Date.now() - openedAt)));
  const cutWire = wire.length;
  const logBefore = (await readPage(page)).log.length;
  step('stable');

  await command('cut');
  const cutAt = Date.now();
  await page.waitForTimeout(CUT_MS);
  let state = await readPage(page);
  const waits = state.log.slice(logBefore).filter((l) => l.state === 'reconnecting');
  const during = wire.slice(cutWire);
  step('observed');

  const { during: missed } = await command('plugged');
  state = await until(page, (s) => s.state === 'open' && chats(s).length >= before + missed, 'the missed messages', 40000);
  await page.waitForTimeout(300);
  state = await readPage(page);

  // What the page reported: the browser's one retry, then the module's
  // backoff, attempt by attempt, each wait within its jitter window.
  const byBrowser = waits.filter((w) => w.by === 'browser');
  const byModule = waits.filter((w) => w.by === 'module');
  check(byBrowser.length <= 1, 'the browser retries at most once on its own', waits);
  check(byModule.length >= 2, 'the module took over with its own waits', waits);
  const outside = byModule.filter((w) => {
    const base = Math.min(30000, 1000 * 2 ** (w.attempt - 1));
    return !(w.delay >= Math.floor(base * 0.7) && w.delay <= base);
  });
  check(outside.length === 0, 'every wait is the jittered backoff of its attempt', byModule.map((w) => [w.attempt, w.delay]));
  const attempts = byModule.map((w) => w.attempt);
  check(attempts.every((a, i) => i === 0 || a === attempts[i - 1] + 1), 'attempts climb one by one', attempts);

  // On the wire: while the server was away, few GETs, each after the wait
  // the module announced before it (not EventSource's fixed loop).
  const gets = during.filter((w) => w.kind === 'request' && w.method === 'GET');
  check(gets.length <= 1 + byModule.length, 'one GET per announced wait (and the browser\'s one retry)', { gets: gets.length, waits: waits.length });
  const moduleGets = gets.filter((g) => /[?&]last_event_id=/.test(g.url));
  const early = [];
  for (let i = 1; i < moduleGets.length && i <= byModule.length; i++) {
    const gap = moduleGets[i].at - moduleGets[i - 1].at;
    if (gap < byModule[i].delay - SLACK_MS) early.push({ gap, delay: byModule[i].delay });
  }
  check(early.length === 0, 'no GET before the announced wait', early);

  const want = [
    ...Array.from({ length: before }, (_, i) => `before ${i + 1}`),
    ...Array.from({ length: missed }, (_, i) => `during ${i + 1}`),
  ];
  checkExactly(chats(state), want, 'chat messages');
  check(state.state === 'open', 'the stream is open at the end', state.state);
  check(state.stateCounts.closed === 0, 'the page never gave up', state.stateCounts);
  return {
    cutMs: Date.now() - cutAt,
    waits: waits.map((w) => ({ by: w.by, attempt: w.attempt, delay: w.delay, reason: w.reason })),
    getsWhileAway: gets.length,
    messages: chats(state).length,
  };
});
