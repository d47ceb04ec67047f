// app.js — the demo page's logic: one session of the résumé-writing agent.
//
// On load it creates a session (POST /sessions) and opens its stream with
// the client module (/sse-scale.js), so the visitor lands on a live page.
// Everything shown comes from the stream: runs, their stages and sections,
// the gate, chat messages and replans, and the connection itself (state,
// instance, every reconnect in a capped log). Requests use the session's
// full token (Authorization: Bearer); the stream URL carries only the
// stream token. All URLs are relative, so the page works unchanged behind
// any balancer that keeps it on one origin.
//
// The page's state is what the stream told it. On `reset` (it resumed from
// an id the server's history no longer reaches) the page cannot know what
// it missed: it keeps what it showed, marks the gap, marks unfinished runs
// as unknown, and refetches what the server still holds — the history
// window named by the reset — with the module's readHistory(). The module
// holds live events back meanwhile, so they follow in order. An app with a
// REST API for its state would fetch that here instead.

import { SseScaleStream, retryDelay, parseRetryAfter } from '/sse-scale.js';

const LOG_MAX = 200;
const FEED_MAX = 1000;
const RUNS_MAX = 20;
const STAGES = ['research', 'outline', 'draft', 'review'];
/** Refresh tokens this long before they expire. */
const REFRESH_EARLY_MS = 10 * 60 * 1000;

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
// `?debug` exposes the session and the stream on `window.sseDemo` for the
// browser tests; with it, `resync-delay=<ms>` makes the refetch after a
// reset that much slower (as a slow API would be), so a test can publish
// while the module holds live events back.
const debug = params.has('debug');
const resyncDelayMs = debug ? Number(params.get('resync-delay')) || 0 : 0;

let session = null;
let stream = null;
/** Arrival order of rendered items, so order can be checked across containers. */
let seq = 0;
const stateCounts = { connecting: 0, open: 0, reconnecting: 0, closed: 0 };

// ---------------------------------------------------------------- helpers

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v !== undefined && v !== null) node.setAttribute(k, String(v));
  }
  if (text !== undefined) node.textContent = text;
  return node;
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(signal.reason);
      return;
    }
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener('abort', () => {
      clearTimeout(timer);
      reject(signal.reason);
    }, { once: true });
  });
}

function clock(at = Date.now()) {
  const d = new Date(at);
  return d.toTimeString().slice(0, 8) + '.' + String(d.getMilliseconds()).padStart(3, '0');
}

function seconds(ms) {
  return `${(ms / 1000).toFixed(1)} s`;
}

function notice(text) {
  const n = $('notice');
  n.textContent = text || '';
  n.hidden = !text;
}

/** Keeps at most `max` children, dropping from the end (`'last'`) or the start. */
function cap(list, max, from) {
  while (list.children.length > max) {
    (from === 'last' ? list.lastElementChild : list.firstElementChild).remove();
  }
}

/** Adds one entry to the connection log (newest first, capped). */
function log(kind, text, data = {}) {
  const list = $('conn-log');
  const item = el('li', { 'data-kind': kind, 'data-at': Date.now(), ...data });
  item.append(el('time', {}, clock()), ' ', text);
  list.prepend(item);
  cap(list, LOG_MAX, 'last');
}

/** A request with the session's full token; throws an Error with status on failure. */
async function api(method, path, body) {
  const res = await fetch(path, {
    method,
    headers: { Authorization: `Bearer ${session.token}`, 'Content-Type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: 'no-store',
  });
  let json = null;
  try {
    json = await res.json();
  } catch {
    json = null;
  }
  if (!res.ok) {
    const error = new Error(json?.error?.message || `HTTP ${res.status}`);
    error.status = res.status;
    error.code = json?.error?.code;
    error.retryAfterMs = parseRetryAfter(res.headers.get('Retry-After'));
    throw error;
  }
  return json;
}

/** Runs a button's request with the button disabled; shows failures. */
async function act(button, what, fn) {
  if (button) button.disabled = true;
  try {
    await fn();
    notice('');
  } catch (error) {
    const wait = error.retryAfterMs ? ` (retry after ${seconds(error.retryAfterMs)})` : '';
    notice(`${what} failed: ${error.message}${wait}`);
  } finally {
    if (button) button.disabled = false;
  }
}

// ---------------------------------------------------------------- runs

function runElement(runId) {
  const runs = $('runs');
  let run = runs.querySelector(`.run[data-run="${CSS.escape(runId)}"]`);
  if (run) return run;
  run = $('run-template').content.firstElementChild.cloneNode(true);
  run.dataset.run = runId;
  run.querySelector('.run-id').textContent = runId.slice(0, 8);
  run.querySelector('.run-id').title = runId;
  runs.prepend(run);
  cap(runs, RUNS_MAX, 'last');
  $('runs-empty').hidden = true;
  return run;
}

function setRunStatus(run, status, label = status) {
  run.dataset.status = status;
  const badge = run.querySelector('.run-status');
  badge.textContent = label;
  badge.dataset.state = status;
  const finished = ['complete', 'failed', 'cancelled'].includes(status);
  run.querySelector('[data-action="cancel"]').hidden = finished;
  if (finished || status !== 'waiting') run.querySelector('.gate').hidden = true;
}

function stageElement(run, stage, index) {
  let item = run.querySelector(`.stage[data-stage="${CSS.escape(stage)}"]`);
  if (!item) {
    item = el('li', { class: 'stage', 'data-run': run.dataset.run, 'data-stage': stage, 'data-status': 'running' });
    const head = el('div', { class: 'stage-head' });
    head.append(el('h4', {}, stage), el('span', { class: 'stage-status' }, 'writing…'));
    item.append(head, el('div', { class: 'sections' }));
    const list = run.querySelector('.stages');
    // Stages in pipeline order even if one arrives late (a history read).
    const position = index ?? STAGES.indexOf(stage);
    item.dataset.index = position;
    const after = [...list.children].find((s) => Number(s.dataset.index) > position);
    list.insertBefore(item, after || null);
  }
  return item;
}

function markStage(item, status, label) {
  item.dataset.status = status;
  item.querySelector('.stage-status').textContent = label;
}

/** Whether the runs or the conversation already show this event (history reads only). */
function shown(id) {
  if (!id) return false;
  const sel = `[data-id="${CSS.escape(id)}"]`;
  return $('runs').querySelector(sel) !== null || $('chat-log').querySelector(sel) !== null;
}

function unfinished(run) {
  return !['complete', 'failed', 'cancelled'].includes(run.dataset.status);
}

const runHandlers = {
  stage_start(ev) {
    const { run_id, stage, index, total_stages } = ev.data;
    const run = runElement(run_id);
    run.dataset.totalStages = total_stages;
    if (unfinished(run)) setRunStatus(run, 'running');
    markStage(stageElement(run, stage, index), 'running', 'writing…');
  },
  section_draft(ev, fromHistory) {
    const { run_id, stage, section, text } = ev.data;
    if (fromHistory && shown(ev.id)) return;
    const run = runElement(run_id);
    if (run.dataset.status === 'unknown') setRunStatus(run, 'running');
    const item = stageElement(run, stage);
    const p = el('p', {
      class: 'section',
      'data-run': run_id,
      'data-stage': stage,
      'data-section': section,
      'data-id': ev.id,
      'data-seq': ++seq,
    }, text);
    item.querySelector('.sections').append(p);
  },
  stage_complete(ev) {
    const { run_id, stage, index } = ev.data;
    markStage(stageElement(runElement(run_id), stage, index), 'done', 'done');
  },
  gate_waiting(ev) {
    const run = runElement(ev.data.run_id);
    setRunStatus(run, 'waiting', 'waiting for you');
    run.querySelector('.gate').hidden = false;
  },
  gate_resolved(ev) {
    const { run_id, approved, feedback } = ev.data;
    const run = runElement(run_id);
    run.querySelector('.gate').hidden = true;
    run.dataset.approved = String(approved);
    const outcome = run.querySelector('.run-outcome');
    outcome.hidden = false;
    outcome.textContent = approved ? 'Approved.' : `Rejected${feedback ? `: ${feedback}` : '.'}`;
    if (unfinished(run)) setRunStatus(run, 'running', approved ? 'finishing' : 'stopping');
  },
  pipeline_complete(ev) {
    const run = runElement(ev.data.run_id);
    setRunStatus(run, 'complete');
    run.dataset.terminalId = ev.id;
    run.dataset.terminalSeq = ++seq;
  },
  pipeline_failed(ev) {
    const run = runElement(ev.data.run_id);
    setRunStatus(run, 'failed');
    run.dataset.terminalId = ev.id;
    run.dataset.terminalSeq = ++seq;
    const outcome = run.querySelector('.run-outcome');
    outcome.hidden = false;
    outcome.textContent = `Failed: ${ev.data.error}`;
  },
  pipeline_cancelled(ev) {
    const run = runElement(ev.data.run_id);
    setRunStatus(run, 'cancelled', `cancelled (${ev.data.reason})`);
    run.dataset.reason = ev.data.reason;
    run.dataset.terminalId = ev.id;
    run.dataset.terminalSeq = ++seq;
  },
};

// ---------------------------------------------------------------- feed

function feedItem(kind, ev, text) {
  const list = $('chat-log');
  const item = el('li', { 'data-kind': kind, 'data-id': ev.id, 'data-seq': ++seq }, text);
  list.append(item);
  cap(list, FEED_MAX, 'first');
  $('chat-empty').hidden = true;
  return item;
}

const feedHandlers = {
  chat_message(ev, fromHistory) {
    if (fromHistory && shown(ev.id)) return;
    feedItem('chat', ev, String(ev.data?.text ?? ''));
  },
  replan(ev, fromHistory) {
    if (fromHistory && shown(ev.id)) return;
    feedItem('replan', ev, `Replanned: ${ev.data?.reason ?? ''}`);
  },
  preferences_updated(ev, fromHistory) {
    if (fromHistory && shown(ev.id)) return;
    feedItem('preferences', ev, `Preferences updated: ${JSON.stringify(ev.data?.preferences ?? {})}`);
  },
};

const handlers = { ...runHandlers, ...feedHandlers };

/** Applies one event to the page; `fromHistory`: read back after a reset. */
function apply(ev, fromHistory = false) {
  const handler = handlers[ev.type];
  if (handler) handler(ev, fromHistory);
}

// ---------------------------------------------------------------- connection

function renderState(change) {
  stateCounts[change.state] = (stateCounts[change.state] || 0) + 1;
  const badge = $('conn-state');
  badge.dataset.state = change.state;
  const counter = $('conn-reconnects');
  counter.textContent = String(stream?.reconnects ?? 0);
  counter.dataset.count = String(stream?.reconnects ?? 0);
  let text = change.state;
  const data = { 'data-state': change.state };
  if (change.state === 'reconnecting') {
    const why = [];
    if (change.status) why.push(`HTTP ${change.status}`);
    else if (change.status === 0) why.push('network error');
    if (change.retryAfterMs != null) why.push(`Retry-After ${seconds(change.retryAfterMs)}`);
    if (change.by === 'browser') {
      text = 'reconnecting (browser, after the retry hint)';
    } else if (change.delayMs == null) {
      text = `reconnecting once the refetch is done (${change.reason})`;
    } else {
      text = `reconnecting in ${seconds(change.delayMs)}${why.length ? ` (${why.join(', ')})` : ''}`;
    }
    Object.assign(data, {
      'data-by': change.by,
      'data-delay': change.delayMs ?? undefined,
      'data-status': change.status ?? undefined,
      'data-retry-after': change.retryAfterMs ?? undefined,
      'data-attempt': change.attempt ?? undefined,
      'data-reason': change.reason ?? undefined,
    });
  } else if (change.state === 'closed' && change.reason !== 'closed') {
    text = `closed: the server refused the stream (HTTP ${change.status})`;
    notice('The stream was refused; reload the page to start a new session.');
    Object.assign(data, { 'data-status': change.status ?? undefined });
  }
  badge.textContent = change.state === 'reconnecting' ? 'reconnecting' : change.state;
  badge.title = text;
  log('state', text, data);
}

function onConnected(ev) {
  const { instance_id } = ev.data;
  const node = $('conn-instance');
  node.textContent = instance_id;
  node.dataset.instance = instance_id;
  log('connected', `stream held by ${instance_id}, from id ${ev.id}`, { 'data-instance': instance_id, 'data-position': ev.id });
}

function onReset(ev) {
  const { last_event_id, oldest_id } = ev.data;
  log('reset', `history no longer reaches ${last_event_id} (it holds ${oldest_id ?? 'nothing'} … ${ev.id}): refetching`, {
    'data-position': ev.id,
  });
  for (const run of $('runs').querySelectorAll('.run')) {
    if (unfinished(run)) setRunStatus(run, 'unknown', 'unknown: events were lost');
  }
  const gap = feedItem('gap', { id: null }, `Missed events after ${last_event_id}: the server's history no longer holds them.`);
  gap.dataset.resetId = ev.id;
  gap.dataset.oldestId = oldest_id ?? '';
  gap.dataset.restored = '';
}

/**
 * The module's resync hook: reread the history window named by the reset.
 * `signal` aborts when the stream is closed meanwhile (the page went into
 * the back/forward cache); the module runs the hook again once it reopens,
 * and what the first run applied is not applied twice (`shown`).
 */
async function resync(reset, source, { signal } = {}) {
  const from = reset.data.oldest_id;
  if (resyncDelayMs) await sleep(resyncDelayMs, signal);
  const { events, complete } = await source.readHistory({ from, to: reset.id, signal });
  for (const ev of events) apply(ev, true);
  const gaps = $('chat-log').querySelectorAll('[data-kind="gap"]');
  const gap = gaps[gaps.length - 1];
  if (gap) {
    gap.dataset.restored = String(events.length);
    gap.textContent += ` Restored ${events.length} event${events.length === 1 ? '' : 's'} it still holds.`;
  }
  log('resync', `refetched ${events.length} events from history${complete ? '' : ' (it moved on meanwhile)'}`, {
    'data-restored': events.length,
  });
}

function openStream() {
  stream = new SseScaleStream({
    url: `/sessions/${encodeURIComponent(session.id)}/events`,
    token: () => session.stream_token,
    resync,
    open: false,
  });
  stream.onState(renderState);
  // A failed refetch after a reset, or a bug in a handler above: shown,
  // while the stream goes on.
  stream.onError((error) => {
    notice(`Updating the page failed: ${error?.message ?? error}`);
    log('error', String(error?.message ?? error));
  });
  stream.on('connected', onConnected);
  stream.on('reset', onReset);
  stream.on('*', (ev) => apply(ev));
  stream.open();
  if (debug) window.sseDemo.stream = stream;
}

// ---------------------------------------------------------------- session

/** POST /sessions, retried with backoff (honouring Retry-After) until it works. */
async function createSession() {
  for (let attempt = 1; ; attempt++) {
    let why;
    let retryAfterMs = null;
    try {
      const res = await fetch('/sessions', { method: 'POST', cache: 'no-store' });
      if (res.status === 201) return await res.json();
      why = `HTTP ${res.status}`;
      retryAfterMs = parseRetryAfter(res.headers.get('Retry-After'));
    } catch {
      why = 'network error';
    }
    const wait = retryDelay(attempt, retryAfterMs);
    notice(`Could not create a session (${why}); retrying in ${seconds(wait)}.`);
    log('session', `POST /sessions: ${why}, retrying in ${seconds(wait)}`);
    await sleep(wait);
  }
}

/** Renews both tokens before they expire (the stream asks for the current one on every connect). */
function scheduleRefresh() {
  const due = session.expires_at * 1000 - REFRESH_EARLY_MS - Date.now();
  setTimeout(async () => {
    try {
      const fresh = await api('POST', `/sessions/${session.id}/tokens`);
      Object.assign(session, fresh);
      log('session', 'tokens refreshed');
    } catch (error) {
      log('session', `token refresh failed: ${error.message}`);
    }
    scheduleRefresh();
  }, Math.max(60_000, Math.min(due, 2 ** 31 - 1)));
}

// ---------------------------------------------------------------- controls

function wireControls() {
  $('start-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const body = {
      gate: $('start-gate').checked,
      sections_per_stage: Number($('start-sections').value),
      step_ms: Number($('start-step').value),
    };
    act($('start'), 'Starting the pipeline', async () => {
      const { run_id } = await api('POST', `/sessions/${session.id}/pipeline`, body);
      // Shown at once; its events may arrive before or after this answer.
      runElement(run_id);
    });
  });
  $('runs').addEventListener('click', (e) => {
    const button = e.target.closest('button[data-action]');
    if (!button) return;
    const run = button.closest('.run');
    const runId = run.dataset.run;
    const path = `/sessions/${session.id}/pipeline/${runId}`;
    if (button.dataset.action === 'cancel') {
      act(button, 'Cancelling', () => api('DELETE', path));
    } else {
      const feedback = run.querySelector('.gate-feedback').value;
      const approve = button.dataset.action === 'approve';
      act(button, approve ? 'Approving' : 'Rejecting', () => api('POST', `${path}/gate`, { approve, feedback }));
    }
  });
  $('chat-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const input = $('chat-text');
    const text = input.value.trim();
    if (!text) return;
    act($('chat-send'), 'Sending', async () => {
      await api('POST', `/sessions/${session.id}/messages`, { text });
      input.value = '';
    });
  });
  $('replan-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const input = $('replan-reason');
    const reason = input.value.trim();
    if (!reason) return;
    act($('replan-send'), 'Replanning', async () => {
      await api('POST', `/sessions/${session.id}/workflow/replan`, { reason });
      input.value = '';
    });
  });
  // A page going into the back/forward cache closes its stream (an open
  // connection would keep it out of the cache) and reopens it when
  // restored; the module resumes from the last event it delivered, so
  // events it was holding back for a refetch are sent again.
  window.addEventListener('pagehide', (e) => {
    if (e.persisted) stream?.close();
  });
  window.addEventListener('pageshow', (e) => {
    if (e.persisted) stream?.open();
  });
}

async function main() {
  if (debug) window.sseDemo = { stateCounts, session: null, stream: null };
  wireControls();
  session = await createSession();
  notice('');
  if (debug) window.sseDemo.session = session;
  const node = $('conn-session');
  node.textContent = session.id.slice(0, 8);
  node.title = session.id;
  node.dataset.session = session.id;
  log('session', `session ${session.id.slice(0, 8)} created`);
  for (const id of ['start', 'chat-send', 'replan-send']) $(id).disabled = false;
  scheduleRefresh();
  openStream();
}

main().catch((error) => {
  notice(`The page failed to start: ${error?.message ?? error}`);
});
