// Scenario: resume beyond history. The page's connection is cut (the Rust
// side's cable drops it and refuses new ones) while many messages are
// published, more than HISTORY_MAXLEN; when the network is back, the
// browser reconnects with Last-Event-ID and gets `reset`. The page must
// mark the gap and refetch its state — the history window the reset names
// — so the newest messages published while it was away show, exactly once
// and in order, followed by the live ones.
//
// The page refetches slowly (`resync-delay`), and the Rust side publishes
// the live messages while it does: the module must hold them back until
// the refetch is done, so they show after the refetched ones.
//
// Protocol: step `connected` → cmd `before` {count} (published, before the
// cut) → step `seen` → cmd `restored` {offline} (cut, published, network
// back) → step `reset` (the page got it and is refetching) → cmd `after`
// {count} (published meanwhile) → result.
//
// Env: HISTORY_MAXLEN (of the server).

import {
  run, launch, openDemo, step, command, check, until, readPage,
} from './harness.mjs';

const MAXLEN = Number(process.env.HISTORY_MAXLEN || 10);
const RESYNC_DELAY_MS = 1500;

run(async () => {
  const page = await launch();
  const info = await openDemo(page, { query: `&resync-delay=${RESYNC_DELAY_MS}` });
  step('connected', info);
  const chats = (s) => s.feed.filter((f) => f.kind === 'chat').map((f) => f.text);

  const { count: before } = await command('before');
  await until(page, (s) => chats(s).length >= before, 'the messages before the cut');
  step('seen');

  const { offline } = await command('restored', 60000);
  let state = await until(page, (s) => s.log.some((l) => l.kind === 'reset'), 'the reset', 30000);
  const resetAt = Date.now();
  step('reset');

  const { count: after } = await command('after');
  const published = Date.now();
  state = await until(
    page,
    (s) => s.log.some((l) => l.kind === 'resync') && chats(s).filter((t) => t.startsWith('after ')).length >= after,
    'the refetch and the live messages',
  );
  check(published - resetAt < RESYNC_DELAY_MS, 'the live messages were published during the refetch', published - resetAt);
  await page.waitForTimeout(300);
  state = await readPage(page);

  check(state.log.some((l) => l.kind === 'reset'), 'the page received reset');
  const items = state.feed.map((f) => (f.kind === 'gap' ? 'GAP' : f.text));
  const gapAt = items.indexOf('GAP');
  check(gapAt !== -1 && items.lastIndexOf('GAP') === gapAt, 'one gap marker', items);
  const want = (prefix, from, to) => Array.from({ length: to - from + 1 }, (_, i) => `${prefix} ${from + i}`);
  const pre = items.slice(0, gapAt);
  const restored = items.slice(gapAt + 1).filter((t) => t.startsWith('offline '));
  const live = items.slice(gapAt + 1).filter((t) => t.startsWith('after '));
  check(JSON.stringify(pre) === JSON.stringify(want('before', 1, before)), 'what was shown before the cut stays', pre);
  // The refetch: the newest offline messages the history still holds, a
  // gapless run ending with the last one; older ones are gone with the
  // history (at most HISTORY_MAXLEN are held, the oldest held is the
  // boundary the read starts after).
  const first = restored.length ? Number(restored[0].split(' ')[1]) : offline + 1;
  check(restored.length >= 1, 'the refetch brought back messages published while offline', items);
  check(
    JSON.stringify(restored) === JSON.stringify(want('offline', first, offline)),
    'the refetched messages are the newest ones, each once, in order',
    restored,
  );
  check(restored.length < MAXLEN + 1 && first > 1, 'older messages were beyond the history', restored.length);
  check(JSON.stringify(live) === JSON.stringify(want('after', 1, after)), 'live messages after the refetch, once each, in order', live);
  check(
    JSON.stringify(items.slice(gapAt + 1)) === JSON.stringify([...restored, ...live]),
    'the refetched messages come before the live ones',
    items.slice(gapAt + 1),
  );
  const gap = state.feed[gapAt];
  check(gap.restored === String(restored.length), 'the gap marker counts what was refetched', gap);
  check(state.state === 'open', 'the stream is open at the end', state.state);
  check(state.stateCounts.closed === 0, 'the page never gave up', state.stateCounts);
  return { before, offline, restored: restored.length, first, after, reconnects: state.reconnects };
});
