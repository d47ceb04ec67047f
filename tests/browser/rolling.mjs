// Scenario: every instance is restarted in turn (SIGTERM drain, back up,
// next) while a pipeline runs and numbered chat messages are published.
// The page's stream is closed by each drain it sits on and resumes
// elsewhere. Every chat message must show exactly once, in order; the
// sections must form a gapless prefix of the run, ended by its terminal
// event (the run's own instance cancels it with reason `shutdown` when it
// drains, unless the run finished first); the page must never give up.
//
// Protocol: step `connected` {sessionId, token, instance} → cmd `done`
// {run_id, messages} once the Rust side restarted all three → result.
//
// Env: SECTIONS (sections per stage of the run).

import {
  run, launch, openDemo, step, command, check, until, arrived, expectedSections, checkExactly, readPage,
} from './harness.mjs';

const SECTIONS = Number(process.env.SECTIONS || 50);

run(async () => {
  const page = await launch();
  const info = await openDemo(page);
  step('connected', info);
  const { run_id: runId, messages } = await command('done', 120000);

  const terminal = (r) => r.run === runId && ['complete', 'cancelled', 'failed'].includes(r.status);
  let state = await until(
    page,
    (s) => s.runs.some(terminal) && s.feed.filter((f) => f.kind === 'chat').length >= messages,
    'every message and the end of the run',
    30000,
  );
  await page.waitForTimeout(300);
  state = await readPage(page);

  const chat = state.feed.filter((f) => f.kind === 'chat').map((f) => f.text);
  checkExactly(chat, Array.from({ length: messages }, (_, i) => `rolling ${i + 1}`), 'chat messages');

  const got = arrived(state, runId);
  const want = expectedSections(SECTIONS);
  checkExactly(got, want.slice(0, got.length), 'sections (a prefix of the run)');
  const end = state.runs.find(terminal);
  const endedOk = end.status === 'complete' || (end.status === 'cancelled' && end.reason === 'shutdown');
  check(endedOk, 'the run ended complete or cancelled by shutdown', end);
  if (end.status === 'complete') checkExactly(got, want, 'sections of a completed run');
  // The terminal event ends the prefix: no section of the run after it.
  const lastSection = Math.max(0, ...state.sections.filter((s) => s.run === runId).map((s) => s.seq));
  check(got.length > 0, 'sections arrived');
  check(end.terminalSeq > lastSection, 'the terminal event came after the last section', { lastSection, terminal: end.terminalSeq });

  const connections = state.log.filter((l) => l.kind === 'connected').map((l) => l.instance);
  check(new Set(connections).size >= 2, 'the stream moved to another instance', connections);
  check(state.state === 'open', 'the stream is open at the end', state.state);
  check(state.stateCounts.closed === 0, 'the page never gave up', state.stateCounts);
  return {
    run: { status: end.status, reason: end.reason, sections: got.length, of: want.length },
    messages: chat.length,
    connections,
    reconnects: state.reconnects,
  };
});
