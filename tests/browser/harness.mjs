// What every browser scenario script shares: launching Debian's Chromium
// with playwright-core, the line protocol with the Rust test that started
// the script (tests/browser.rs), reading the demo page's state from its
// DOM, and the checks.
//
// Protocol: the script writes one JSON object per line to stdout —
// `{"step": name, ...}` when it reaches a point the Rust side waits for,
// and last `{"result": {...}, "ok": bool, "failures": [...]}` — and reads
// `{"cmd": name, ...}` lines from stdin when it waits for the Rust side
// (which kills instances, publishes, cuts the network...). The exit code is
// 0 only when every check held.
//
// Environment: PLAYWRIGHT_DIR (from tests/browser/setup.sh), BASE_URL (the
// page's origin), ARTIFACT (where the screenshot goes), CHROMIUM (default
// /usr/bin/chromium).

import { createRequire } from 'node:module';
import { mkdtempSync, rmSync, mkdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { tmpdir } from 'node:os';
import readline from 'node:readline';

const require = createRequire(join(process.env.PLAYWRIGHT_DIR || '.', 'node_modules', '/'));
const { chromium } = require('playwright-core');

export const BASE_URL = process.env.BASE_URL;
export const STAGES = ['research', 'outline', 'draft', 'review'];

// Flags for a closed network: no QUIC, no background fetches, no updates.
const ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

const failures = [];
const problems = [];
let context = null;
let page = null;
let userDataDir = null;

export function step(name, data = {}) {
  process.stdout.write(JSON.stringify({ step: name, ...data }) + '\n');
}

// Commands from the Rust side, queued until asked for.
const queued = [];
const waiting = [];
const input = readline.createInterface({ input: process.stdin });
input.on('line', (line) => {
  let msg;
  try {
    msg = JSON.parse(line);
  } catch {
    return;
  }
  const i = waiting.findIndex((w) => w.name === msg.cmd);
  if (i >= 0) waiting.splice(i, 1)[0].resolve(msg);
  else queued.push(msg);
});

/** Waits for `{"cmd": name}` from the Rust side. */
export function command(name, timeoutMs = 60000) {
  const i = queued.findIndex((m) => m.cmd === name);
  if (i >= 0) return Promise.resolve(queued.splice(i, 1)[0]);
  return new Promise((resolve, reject) => {
    const entry = { name, resolve };
    waiting.push(entry);
    setTimeout(() => {
      const j = waiting.indexOf(entry);
      if (j >= 0) {
        waiting.splice(j, 1);
        reject(new Error(`no command ${name} within ${timeoutMs} ms`));
      }
    }, timeoutMs).unref();
  });
}

/** Records a failed check (the script goes on, so the result shows all of them). */
export function check(ok, message, detail) {
  if (!ok) failures.push(detail === undefined ? message : `${message}: ${JSON.stringify(detail)}`);
  return ok;
}

/** Launches Chromium with a fresh profile and opens one page. */
export async function launch() {
  userDataDir = mkdtempSync(join(tmpdir(), 'sse-scale-chromium-'));
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ARGS,
    viewport: { width: 1280, height: 960 },
  });
  page = context.pages()[0] ?? (await context.newPage());
  // Anything the page logs as an error, or throws without catching
  // (unhandled promise rejections included), fails the scenario.
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error' && !/Failed to load resource/.test(m.text())) {
      problems.push(`console error: ${m.text()}`);
    }
  });
  return page;
}

/**
 * Records every request to the stream URL and its answer: what the page
 * really did on the wire, independent of what the page reports about
 * itself. Times are the browser's own (`request.timing()`: when the request
 * started, when the answer's head arrived), so how late node hears of an
 * event does not skew them; node's clock is the fallback.
 */
export function recordStreamRequests(p) {
  const log = [];
  const isStream = (url) => /\/sessions\/[^/]+\/events(\?|$)/.test(url);
  p.on('request', (r) => {
    if (!isStream(r.url())) return;
    const entry = { kind: 'request', method: r.method(), seen: Date.now(), url: r.url() };
    Object.defineProperty(entry, 'request', { value: r });
    Object.defineProperty(entry, 'at', { enumerable: true, get: () => started(entry) });
    log.push(entry);
  });
  p.on('response', (r) => {
    if (!isStream(r.url())) return;
    const entry = {
      kind: 'response',
      method: r.request().method(),
      seen: Date.now(),
      status: r.status(),
      retryAfter: r.headers()['retry-after'] ?? null,
    };
    Object.defineProperty(entry, 'request', { value: r.request() });
    Object.defineProperty(entry, 'at', { enumerable: true, get: () => answered(entry) });
    log.push(entry);
  });
  p.on('requestfailed', (r) => {
    if (isStream(r.url())) log.push({ kind: 'failed', method: r.method(), at: Date.now(), error: r.failure()?.errorText });
  });
  return log;
}

function started(entry) {
  const t = entry.request.timing();
  return t.startTime > 0 ? t.startTime : entry.seen;
}

function answered(entry) {
  const t = entry.request.timing();
  return t.startTime > 0 && t.responseStart >= 0 ? t.startTime + t.responseStart : entry.seen;
}

/**
 * Opens the demo page (with `?debug`, which exposes `window.sseDemo`, and
 * `query`, e.g. `&resync-delay=1500`) and waits for its stream.
 */
export async function openDemo(p, { query = '', timeout = 20000 } = {}) {
  await p.goto(`${BASE_URL}/?debug${query}`);
  await p.waitForSelector('#conn-state[data-state="open"]', { timeout });
  await p.waitForFunction(() => document.querySelector('#conn-instance').dataset.instance !== '', null, { timeout });
  return p.evaluate(() => ({
    sessionId: window.sseDemo.session.id,
    token: window.sseDemo.session.token,
    instance: document.querySelector('#conn-instance').dataset.instance,
  }));
}

/** Everything the page shows, read from the DOM. */
export function readPage(p) {
  return p.evaluate(() => {
    const all = (sel) => [...document.querySelectorAll(sel)];
    return {
      state: document.querySelector('#conn-state').dataset.state,
      instance: document.querySelector('#conn-instance').dataset.instance,
      reconnects: Number(document.querySelector('#conn-reconnects').dataset.count),
      stateCounts: { ...window.sseDemo.stateCounts },
      notice: document.querySelector('#notice').hidden ? null : document.querySelector('#notice').textContent,
      runs: all('.run').map((r) => ({
        run: r.dataset.run,
        status: r.dataset.status,
        reason: r.dataset.reason ?? null,
        approved: r.dataset.approved ?? null,
        gateVisible: !r.querySelector('.gate').hidden,
        terminalSeq: r.dataset.terminalSeq === undefined ? null : Number(r.dataset.terminalSeq),
      })),
      sections: all('.section').map((s) => ({
        run: s.dataset.run,
        stage: s.dataset.stage,
        section: Number(s.dataset.section),
        id: s.dataset.id,
        seq: Number(s.dataset.seq),
      })),
      feed: all('#chat-log li').map((li) => ({
        kind: li.dataset.kind,
        text: li.textContent,
        id: li.dataset.id ?? null,
        seq: Number(li.dataset.seq),
        restored: li.dataset.restored ?? null,
      })),
      log: all('#conn-log li').reverse().map((li) => ({
        kind: li.dataset.kind,
        at: Number(li.dataset.at),
        state: li.dataset.state ?? null,
        by: li.dataset.by ?? null,
        delay: li.dataset.delay === undefined ? null : Number(li.dataset.delay),
        status: li.dataset.status === undefined ? null : Number(li.dataset.status),
        retryAfter: li.dataset.retryAfter === undefined ? null : Number(li.dataset.retryAfter),
        attempt: li.dataset.attempt === undefined ? null : Number(li.dataset.attempt),
        reason: li.dataset.reason ?? null,
        instance: li.dataset.instance ?? null,
        position: li.dataset.position ?? null,
        text: li.textContent,
      })),
    };
  });
}

/** The sections of `run` in arrival order, as `stage/section` keys. */
export function arrived(state, run) {
  return state.sections
    .filter((s) => s.run === run)
    .sort((a, b) => a.seq - b.seq)
    .map((s) => `${s.stage}/${s.section}`);
}

/** `stage/section` keys of a whole run, in pipeline order. */
export function expectedSections(sectionsPerStage, stages = STAGES) {
  return stages.flatMap((stage) => Array.from({ length: sectionsPerStage }, (_, i) => `${stage}/${i}`));
}

/** Checks that `got` is `want` exactly: every item once, in order. */
export function checkExactly(got, want, what) {
  const same = got.length === want.length && got.every((x, i) => x === want[i]);
  if (same) return true;
  const counts = new Map();
  for (const x of got) counts.set(x, (counts.get(x) || 0) + 1);
  const missing = want.filter((x) => !counts.has(x));
  const doubled = [...counts].filter(([, n]) => n > 1).map(([x]) => x);
  return check(false, `${what}: not exactly once in order`, { got: got.length, want: want.length, missing, doubled, first: got.slice(0, 5) });
}

/** Polls the page until `pred(state)` holds; returns the last state. */
export async function until(p, pred, what, timeoutMs = 20000) {
  const deadline = Date.now() + timeoutMs;
  let state;
  for (;;) {
    state = await readPage(p);
    if (pred(state)) return state;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}; page: ${JSON.stringify(summary(state))}`);
    await p.waitForTimeout(100);
  }
}

function summary(state) {
  return {
    state: state.state,
    instance: state.instance,
    runs: state.runs,
    sections: state.sections.length,
    feed: state.feed.length,
    log: state.log.slice(-8).map((l) => l.text),
  };
}

async function screenshot() {
  const path = process.env.ARTIFACT;
  if (!path || !page) return;
  try {
    mkdirSync(dirname(path), { recursive: true });
    await page.screenshot({ path, fullPage: true });
  } catch (e) {
    problems.push(`screenshot failed: ${e.message}`);
  }
}

/** Runs a scenario: `main` returns the result; prints it and exits 0 only if every check held. */
export async function run(main) {
  let result = null;
  try {
    result = await main();
  } catch (e) {
    failures.push(`scenario threw: ${e?.stack ?? e}`);
  }
  await screenshot();
  for (const p of problems) failures.push(p);
  if (page && failures.length) {
    try {
      result = { ...(result || {}), page: summary(await readPage(page)) };
    } catch {
      // The page may be gone; the failures say why.
    }
  }
  try {
    await context?.close();
  } catch {
    // Closing a browser that already died is not a further failure.
  }
  if (userDataDir) rmSync(userDataDir, { recursive: true, force: true });
  const ok = failures.length === 0;
  process.stdout.write(JSON.stringify({ result, ok, failures }) + '\n');
  input.close();
  process.exit(ok ? 0 : 1);
}
