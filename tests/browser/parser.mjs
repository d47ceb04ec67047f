// The client module's pure parts under Node, no browser: the event-stream
// parser against the WHATWG rules (line endings, BOM, comments, multi-line
// data, id persistence and NUL, retry digits, fields without a colon, a
// block cut off at the end), chunking invariance, `Retry-After` parsing
// and the backoff's floor. Prints `{"result", "ok", "failures"}` like the
// browser scenarios and exits non-zero on failure.

import { SseParser, parseRetryAfter, retryDelay, compareIds } from '../../src/js/sse-scale.js';

const failures = [];
let checks = 0;
function same(got, want, what) {
  checks += 1;
  const g = JSON.stringify(got);
  const w = JSON.stringify(want);
  if (g !== w) failures.push(`${what}: got ${g}, want ${w}`);
}

/** Events, retries and comments of `chunks` fed in order; the final id. */
function parse(chunks) {
  const out = [];
  const p = new SseParser({
    onEvent: (e) => out.push(['event', e.type, e.data, e.id]),
    onRetry: (ms) => out.push(['retry', ms]),
    onComment: (c) => out.push(['comment', c]),
  });
  for (const c of chunks) p.feed(c);
  return { out, lastEventId: p.lastEventId };
}

const cases = [
  ['a full event', 'id: 1\nevent: a\ndata: x\n\n', [['event', 'a', 'x', '1']]],
  ['multi-line data joins with LF', 'data: a\ndata: b\n\n', [['event', 'message', 'a\nb', '']]],
  ['CRLF line ends', 'data: a\r\ndata: b\r\n\r\n', [['event', 'message', 'a\nb', '']]],
  ['CR line ends', 'data: a\rdata: b\r\r', [['event', 'message', 'a\nb', '']]],
  ['a leading BOM is dropped', '\uFEFFdata: x\n\n', [['event', 'message', 'x', '']]],
  ['comments dispatch nothing', ': heartbeat\n\n', [['comment', ' heartbeat']]],
  ['retry takes digits', 'retry: 1500\n\n', [['retry', 1500]]],
  ['retry ignores anything else', 'retry: 1.5\nretry: x\nretry:\n\n', []],
  ['an id with NUL is ignored', 'id: 1\ndata: a\n\nid: 2\u00003\ndata: b\n\n', [['event', 'message', 'a', '1'], ['event', 'message', 'b', '1']]],
  ['the id persists', 'id: 5\ndata: a\n\ndata: b\n\n', [['event', 'message', 'a', '5'], ['event', 'message', 'b', '5']]],
  ['an empty id clears it', 'id: 5\ndata: a\n\nid\ndata: b\n\n', [['event', 'message', 'a', '5'], ['event', 'message', 'b', '']]],
  ['no data, no event', 'id: 7\nevent: a\n\ndata: b\n\n', [['event', 'message', 'b', '7']]],
  ['a field without a colon', 'data\n\n', [['event', 'message', '', '']]],
  ['one space is stripped', 'data:x\n\ndata:  y\n\n', [['event', 'message', 'x', ''], ['event', 'message', ' y', '']]],
  ['unknown fields are ignored', 'foo: bar\ndata: x\n\n', [['event', 'message', 'x', '']]],
  ['a block cut off at the end is dropped', 'data: x\n', []],
  ['the type resets after each block', 'event: a\ndata: 1\n\ndata: 2\n\n', [['event', 'a', '1', ''], ['event', 'message', '2', '']]],
  ['an empty data line', 'data:\n\n', [['event', 'message', '', '']]],
  ['a trailing empty data line keeps one LF', 'data: a\ndata:\n\n', [['event', 'message', 'a\n', '']]],
  [
    'the server\'s stream',
    'retry: 2000\n\nid: 0-0\nevent: connected\ndata: {"instance_id":"web-1"}\n\n: heartbeat\n\nid: 17-0\nevent: chat_message\ndata: {"text":"hi"}\n\n',
    [['retry', 2000], ['event', 'connected', '{"instance_id":"web-1"}', '0-0'], ['comment', ' heartbeat'], ['event', 'chat_message', '{"text":"hi"}', '17-0']],
  ],
];

for (const [what, text, want] of cases) {
  same(parse([text]).out, want, what);
  // Any split gives the same events: one character at a time, and every
  // cut in two (a CRLF torn between chunks included).
  same(parse([...text]).out, want, `${what} (char by char)`);
  for (let i = 1; i < text.length; i++) {
    const got = parse([text.slice(0, i), text.slice(i)]).out;
    if (JSON.stringify(got) !== JSON.stringify(want)) {
      same(got, want, `${what} (cut at ${i})`);
      break;
    }
  }
}
same(parse(['data: a\r', '\n', '\r\n']).out, [['event', 'message', 'a', '']], 'CRLF across three chunks');
same(parse(['id: 3\n\n']).lastEventId, '3', 'an id block without data still moves the last id');

{
  const p = new SseParser({ maxLineLength: 10 });
  let threw = false;
  try {
    p.feed('data: 0123456789abcdef');
  } catch {
    threw = true;
  }
  same(threw, true, 'an endless line is refused (bounded memory)');
}
{
  // The limit does not depend on the chunking: a long line that arrives
  // whole is refused as one that arrives in pieces.
  const text = 'data: a\n\ndata: 0123456789abcdef\n\ndata: b\n\n';
  const outcome = (chunks) => {
    const out = [];
    const p = new SseParser({ maxLineLength: 10, onEvent: (e) => out.push(e.data) });
    try {
      for (const c of chunks) p.feed(c);
    } catch {
      out.push('refused');
    }
    return out;
  };
  same(outcome([text]), ['a', 'refused'], 'a long complete line is refused');
  same(outcome([...text]), ['a', 'refused'], 'a long line fed char by char is refused');
}

same(parseRetryAfter('2'), 2000, 'Retry-After in seconds');
same(parseRetryAfter(' 0 '), 0, 'Retry-After 0');
same(parseRetryAfter(new Date(10_000 + 5000).toUTCString(), 10_000), 5000, 'Retry-After as an HTTP date');
same(parseRetryAfter('soon'), null, 'an unreadable Retry-After');
same(parseRetryAfter('1.5'), null, 'Retry-After delay-seconds are digits only (not a date either)');
same(parseRetryAfter('Sun, 06 Nov 1994 08:49:37 GMT', Date.UTC(1994, 10, 6, 8, 49, 30)), 7000, 'Retry-After as an IMF-fixdate');
same(parseRetryAfter(null), null, 'no Retry-After');

for (const r of [() => 0, () => 0.5, () => 0.999]) {
  for (let attempt = 1; attempt <= 10; attempt++) {
    const d = retryDelay(attempt, 2000, {}, r);
    if (d < 2000) same(d >= 2000, true, `attempt ${attempt}: never before Retry-After`);
    const b = retryDelay(attempt, null, {}, r);
    const exp = Math.min(30000, 1000 * 2 ** (attempt - 1));
    if (b > exp || b < exp * 0.7 - 1) same([b, exp], 'within [0.7, 1] of the backoff', `attempt ${attempt} backoff`);
  }
}
same(retryDelay(1, 60000, { maxMs: 5000 }, () => 0), 60000, 'a Retry-After above maxMs is obeyed');
same(retryDelay(3, null, { initialMs: 100, jitter: 0 }), 400, 'the backoff doubles');

same(compareIds('10-2', '9-5'), 1, 'ids order by milliseconds first');
same(compareIds('10-2', '10-11'), -1, 'then by sequence, as numbers');
same(compareIds('18446744073709551615-0', '18446744073709551615-0'), 0, 'ids beyond 2^53');
same(compareIds('x', '1-0'), null, 'not an id');

const ok = failures.length === 0;
process.stdout.write(JSON.stringify({ result: { checks }, ok, failures }) + '\n');
process.exit(ok ? 0 : 1);
