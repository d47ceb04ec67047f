// Scenario: a visitor runs a gated pipeline to completion through a
// balancer. The page creates its session and opens its stream on load; the
// visitor starts the pipeline from the form, sends a chat message and a
// replan while it waits at the gate, and approves it. Every section must
// show exactly once, in order, and the chat message and replan once each.
//
// Env: SECTIONS (sections per stage), STEP_MS (pace).

import {
  run, launch, openDemo, step, check, until, arrived, expectedSections, checkExactly, readPage,
} from './harness.mjs';

const SECTIONS = Number(process.env.SECTIONS || 3);
const STEP_MS = Number(process.env.STEP_MS || 100);

run(async () => {
  const page = await launch();
  const info = await openDemo(page);
  step('connected', info);

  await page.fill('#start-sections', String(SECTIONS));
  await page.fill('#start-step', String(STEP_MS));
  await page.check('#start-gate');
  await page.click('#start');
  let state = await until(page, (s) => s.runs.some((r) => r.status === 'waiting' && r.gateVisible), 'the gate');
  const runId = state.runs.find((r) => r.status === 'waiting').run;
  check(state.runs.length === 1, 'one run', state.runs);

  await page.fill('#chat-text', 'Make the summary shorter');
  await page.click('#chat-send');
  await page.fill('#replan-reason', 'Targeting a data-engineering role');
  await page.click('#replan-send');
  await until(page, (s) => s.feed.length >= 2, 'the chat message and the replan');

  await page.fill('.run .gate-feedback', 'Looks good');
  await page.click('.run [data-action="approve"]');
  state = await until(page, (s) => s.runs[0]?.status === 'complete', 'pipeline_complete');
  // Anything doubled would arrive right behind.
  await page.waitForTimeout(300);
  state = await readPage(page);

  checkExactly(arrived(state, runId), expectedSections(SECTIONS), 'sections');
  check(state.runs[0].approved === 'true', 'the gate was resolved as approved', state.runs[0]);
  check(!state.runs[0].gateVisible, 'the gate is hidden once resolved');
  checkExactly(
    state.feed.map((f) => `${f.kind}:${f.text}`),
    ['chat:Make the summary shorter', 'replan:Replanned: Targeting a data-engineering role'],
    'chat message and replan',
  );
  check(state.state === 'open', 'the stream is open at the end', state.state);
  check(state.stateCounts.closed === 0, 'the stream never closed', state.stateCounts);
  check(state.notice === null, 'no error notice', state.notice);
  return { instance: state.instance, run: runId, sections: state.sections.length, reconnects: state.reconnects };
});
