// Scenario: the page goes into the back/forward cache and comes back while
// it is refetching its state after a `reset`, with live events held back
// by the module. The demo page closes its stream on `pagehide` and reopens
// it on `pageshow` (both with `persisted`); the scenario fires those two
// events itself, as the browser does around the cache, so the timing is
// the test's, not the cache's eligibility rules'.
//
// First the page goes away (its stream closed at id 0-0) while more
// messages than HISTORY_MAXLEN are published; back, its resume from 0-0
// gets `reset` and a slow refetch (`resync-delay`). Live messages are
// published during the refetch (the module holds them), then the page
// goes away and back again before the refetch is done, and one more live
// message is published. Every live message must show once, in order,
// after the refetched ones, and the reopen must resume from the reset (on
// the wire: `?last_event_id=` is the reset's id, not the newest held one).
//
// Protocol: step `connected` → step `away` (stream closed) → cmd
// `published` {offline} → step `reset` → cmd `live` {count} → step
// `reopened` → cmd `after` {count} → result.
//
// Env: HISTORY_MAXLEN (of the servers).

import {
  run, launch, openDemo, step, command, check, until, readPage, recordStreamRequests, checkExactly,
} from './harness.mjs';

const MAXLEN = Number(process.env.HISTORY_MAXLEN || 10);
const RESYNC_DELAY_MS = 4000;

/** The demo page's own bfcache handlers, driven as the browser would. */
function transition(page, type) {
  return page.evaluate((t) => window.dispatchEvent(new PageTransitionEvent(t, { persisted: true })), type);
}

run(async () => {
  const page = await launch();
  const wire = recordStreamRequests(page);
  const info = await openDemo(page, { query: `&resync-delay=${RESYNC_DELAY_MS}` });
  step('connected', info);
  const chats = (s) => s.feed.filter((f) => f.kind === 'chat').map((f) => f.text);

  await transition(page, 'pagehide');
  await until(page, (s) => s.state === 'closed', 'the stream closed on pagehide');
  step('away');
  const { offline } = await command('published');
  await transition(page, 'pageshow');
  let state = await until(page, (s) => s.log.some((l) => l.kind === 'reset'), 'the reset', 30000);
  const resetAt = Date.now();
  const resetId = state.log.find((l) => l.kind === 'reset').position;
  step('reset');

  const { count: live } = await command('live');
  // The live messages reach the module and wait behind the refetch.
  await page.waitForFunction((n) => window.sseDemo.stream._held.length >= n, live, { timeout: 10000 })
    .catch(() => {});
  const held = await page.evaluate(() => window.sseDemo.stream._held.length);
  check(held === live, 'the live messages are held while the page refetches', held);
  check(!chats(await readPage(page)).some((t) => t.startsWith('live ')), 'nothing live shows before the refetch');
  const beforeReopen = wire.length;
  await transition(page, 'pagehide');
  await transition(page, 'pageshow');
  check(Date.now() - resetAt < RESYNC_DELAY_MS, 'closed and reopened during the refetch', Date.now() - resetAt);
  step('reopened');

  const { count: total } = await command('after');
  state = await until(
    page,
    (s) => s.log.some((l) => l.kind === 'resync') && chats(s).filter((t) => t.startsWith('live ')).length >= total,
    'the refetch and every live message',
    30000,
  );
  await page.waitForTimeout(500);
  state = await readPage(page);

  const items = state.feed.map((f) => (f.kind === 'gap' ? 'GAP' : f.text));
  const gapAt = items.indexOf('GAP');
  check(gapAt !== -1 && items.lastIndexOf('GAP') === gapAt, 'one gap marker', items);
  const after = items.slice(gapAt + 1);
  const restored = after.filter((t) => t.startsWith('offline '));
  const first = restored.length ? Number(restored[0].split(' ')[1]) : offline + 1;
  checkExactly(restored, Array.from({ length: offline - first + 1 }, (_, i) => `offline ${first + i}`), 'refetched messages');
  check(restored.length >= 1 && restored.length <= MAXLEN && first > 1, 'the refetch brought the newest messages the history holds', restored);
  checkExactly(
    after.filter((t) => t.startsWith('live ')),
    Array.from({ length: total }, (_, i) => `live ${i + 1}`),
    'live messages',
  );
  check(JSON.stringify(after) === JSON.stringify([...restored, ...after.filter((t) => t.startsWith('live '))]), 'the refetched messages come first', after);

  // On the wire: the reopen resumed from the reset, not from a held event.
  const reopen = wire.slice(beforeReopen).find((w) => w.kind === 'request' && w.method === 'GET');
  const from = reopen ? new URL(reopen.url).searchParams.get('last_event_id') : null;
  check(from === resetId, 'the reopen resumed from the reset\'s id', { from, resetId });
  check(!state.log.some((l) => l.kind === 'error'), 'no error shown', state.log.filter((l) => l.kind === 'error'));
  check(state.state === 'open', 'the stream is open at the end', state.state);
  return { offline, restored: restored.length, live: total, held, resetId, reopenedFrom: from };
});
