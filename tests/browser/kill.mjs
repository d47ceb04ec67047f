// Scenario: the instance holding the page's stream is killed (SIGKILL)
// while a pipeline runs on another instance. The page's stream breaks, the
// browser reconnects through the balancer with Last-Event-ID, lands on a
// live instance and resumes: every section exactly once, in order.
//
// Protocol: step `connected` {sessionId, token, instance} → cmd `started`
// (the Rust side started the run on another instance) → step `mid` once a
// few sections arrived → cmd `killed` → result.
//
// Env: SECTIONS (sections per stage of the run the Rust side starts).

import {
  run, launch, openDemo, step, command, check, until, arrived, expectedSections, checkExactly, readPage,
} from './harness.mjs';

const SECTIONS = Number(process.env.SECTIONS || 5);

run(async () => {
  const page = await launch();
  const info = await openDemo(page);
  step('connected', info);
  const { run_id: runId } = await command('started');

  await until(page, (s) => arrived(s, runId).length >= 4, 'the first sections');
  step('mid', { sections: arrived(await readPage(page), runId).length });
  await command('killed');

  let state = await until(page, (s) => s.runs.some((r) => r.run === runId && r.status === 'complete'), 'pipeline_complete', 30000);
  await page.waitForTimeout(300);
  state = await readPage(page);

  // Requests go through the balancer to a live instance as well.
  await page.fill('#chat-text', 'Still here after the failover');
  await page.click('#chat-send');
  state = await until(page, (s) => s.feed.some((f) => f.text === 'Still here after the failover'), 'the chat message');
  await page.waitForTimeout(200);
  state = await readPage(page);
  check(state.feed.filter((f) => f.kind === 'chat').length === 1, 'the chat message shows once', state.feed);

  checkExactly(arrived(state, runId), expectedSections(SECTIONS), 'sections');
  const connections = state.log.filter((l) => l.kind === 'connected').map((l) => l.instance);
  check(connections.length >= 2, 'the stream reconnected', connections);
  check(connections.slice(1).every((i) => i !== info.instance), 'no reconnect reached the killed instance', connections);
  check(state.instance !== info.instance, 'the page shows the new instance', state.instance);
  check(state.log.some((l) => l.state === 'reconnecting'), 'the log shows the reconnect');
  check(state.state === 'open', 'the stream is open at the end', state.state);
  check(state.stateCounts.closed === 0, 'the page never gave up', state.stateCounts);
  return { killed: info.instance, connections, sections: state.sections.length, reconnects: state.reconnects };
});
