//! The checker. It reads only what the clients saw (their connections,
//! the `Last-Event-ID` each sent, the events and resets that arrived) and
//! the publishers' answers, plus when each fault happened, and decides per
//! client whether the promise of docs/delivery.md held:
//!
//! every accepted publish of a session (a 202 with an id) that the client
//! is owed arrives exactly once, in increasing id order, or the client is
//! told with a `reset` whose id is at or past it, where the gap would be.
//!
//! Violations (each fails the run):
//!
//! - **LOST**: an owed event never arrived, and no reset covers it on the
//!   connection where it is missing.
//! - **SILENT GAP**: a resume answered `connected` and then a replay or a
//!   live event past an owed event it never delivered, with no reset.
//! - **DUPLICATED**: an event (one publish) arrived twice.
//! - **OUT OF ORDER**: an event at or below the client's position, or a
//!   reset that moved the position back; positions are tracked over the
//!   client's whole life, across connections, resets included.
//! - **SHARED ID**: two accepted publishes of one session were given the
//!   same id.
//! - **WRONG ID**: an event arrived under another id than its 202 named,
//!   where no outbox could have given it a new one.
//!
//! Owed: every accepted event of the client's session whose id is above
//! the position of the client's first `connected`, except where
//! docs/delivery.md ("Where it stops") says the system does not promise it.
//! Each such exception is a rule below, named in the report with how many
//! events it excused:
//!
//! - [`Rule::FlagOffOnItsInstance`]: "Events published with the flag off
//!   stay on the publishing instance": an event accepted with a local id
//!   while a flip or a rollout change had the flag off (until every instance had polled it
//!   on again) may be absent for a client that was not streaming from the
//!   instance that accepted it. (With Redis up, an instance keeps a
//!   session's events only while no other instance publishes it through
//!   Redis; with Redis away, while it has not learned that one does.)
//! - [`Rule::OutboxOfStoppedInstance`]: "An instance that stops ... or dies
//!   before its outbox reached Redis loses what is left of it — Redis down
//!   or already back." An event accepted with a local id (the instance
//!   could not reach Redis) by an instance that was then stopped (SIGKILL
//!   or SIGTERM) before Redis was back and its outbox had a moment to flush
//!   may be absent; so may one stopped later, while the instance's client
//!   was still reconnecting, if no other instance ever delivered it.
//! - [`Rule::ConnectedWhileRedisUnreadable`]: "Connecting while Redis
//!   cannot be read": the first position is the newest event the
//!   instance holds, so events accepted before the client's first
//!   `connected` with ids past it may be absent when Redis was unreachable
//!   then.
//! - [`Rule::OwnEventRacedLostConnection`]: "An own event whose publish
//!   reply raced a lost connection ... needs Redis to lose the event too,
//!   in that instant": an event that reached Redis (a sequence id) while
//!   its publish was in flight when Redis was killed and restarted empty
//!   may be absent for clients streaming from the publishing instance
//!   then.
//! - [`Rule::IdReusedAfterEmptyRestart`]: "Redis restarted empty, before a
//!   subscriber noticed": two accepted events may share an id when Redis
//!   restarted empty between their publishes; one of them may be absent.
//! - Repeats: "A publish whose reply times out ... clients may receive it
//!   twice (under two ids)": one publish arriving twice under two
//!   different ids is not a DUPLICATED when its request was in flight
//!   while Redis was unreachable (counted as a documented repeat).
//! - Reassigned ids: "outbox events may be given new ids
//!   (`outbox_reassigned`)": an event accepted with a local id may arrive
//!   under another id (counted).
//!
//! Resets never fail a run. Each is given the first documented cause that
//! fits (Redis restarted empty since the client's id; Redis unreachable
//! when the resume read history; a resume from a local id; more than
//! `REPLAY_MAX_BYTES` or `HISTORY_MAXLEN` behind; a `history_gap` reset
//! after Redis restarted empty; an `out_of_order` reset after a Redis
//! outage). A resume reset with none of them is a **false
//! reset**: counted and listed with the faults around it.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use crate::log::*;
use crate::nemesis::Kind;

/// After Redis is back, instances notice within their 250 ms probe; this
/// much more is allowed before a reset is no longer "Redis unreachable".
const REDIS_BACK_MARGIN: u64 = 2_000;
/// After Redis is back, an outbox is flushed (and a stopping instance gets
/// its last attempt) within this long.
const OUTBOX_FLUSH_MARGIN: u64 = 3_000;
/// How long after an outage an instance may still hold its outbox: its
/// shared Redis client reconnects on its own schedule (seconds, under
/// load), and only then does the outbox flush.
const OUTBOX_RECONNECT_MARGIN: u64 = 10_000;
/// Events published through an outage can arrive late (outbox flush,
/// subscriber backoff up to 5 s) this long after Redis is back.
const LATE_MARGIN: u64 = 10_000;
/// After a switch in Unleash, every instance has polled it (every second)
/// within this long.
const FLAG_FOLLOW_MARGIN: u64 = 3_000;
/// `HISTORY_MAXLEN` of the instances (the default).
const HISTORY_MAXLEN: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum VKind {
    Lost,
    SilentGap,
    Duplicated,
    OutOfOrder,
    SharedId,
    WrongId,
}

impl VKind {
    pub const ALL: [VKind; 6] = [
        VKind::Lost,
        VKind::SilentGap,
        VKind::Duplicated,
        VKind::OutOfOrder,
        VKind::SharedId,
        VKind::WrongId,
    ];

    pub fn name(self) -> &'static str {
        match self {
            VKind::Lost => "LOST",
            VKind::SilentGap => "SILENT GAP",
            VKind::Duplicated => "DUPLICATED",
            VKind::OutOfOrder => "OUT OF ORDER",
            VKind::SharedId => "SHARED ID",
            VKind::WrongId => "WRONG ID",
        }
    }
}

/// The documented exceptions that excuse an absent event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rule {
    FlagOffOnItsInstance,
    OutboxOfStoppedInstance,
    ConnectedWhileRedisUnreadable,
    OwnEventRacedLostConnection,
    IdReusedAfterEmptyRestart,
}

impl Rule {
    pub fn name(self) -> &'static str {
        match self {
            Rule::FlagOffOnItsInstance => "flag-off event of an instance the client was not on",
            Rule::OutboxOfStoppedInstance => {
                "outbox of an instance stopped before it reached Redis"
            }
            Rule::ConnectedWhileRedisUnreadable => {
                "accepted before a connect that could not read Redis"
            }
            Rule::OwnEventRacedLostConnection => "publish in flight when Redis was killed empty",
            Rule::IdReusedAfterEmptyRestart => "id given again after Redis restarted empty",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Violation {
    pub kind: VKind,
    pub client: String,
    pub detail: String,
    /// The client's log around the problem, the publish and the faults
    /// near it.
    pub context: String,
}

/// Figures of one run.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub faults: BTreeMap<&'static str, usize>,
    pub accepted: usize,
    /// Non-202 answers and requests that got no answer, by status.
    pub refused: BTreeMap<String, usize>,
    /// (client, owed event) pairs checked.
    pub owed: usize,
    pub received: usize,
    pub covered_by_reset: usize,
    /// Of those, covered by the reset that opened the next connection (the
    /// gap's stream had ended).
    pub covered_on_next_connection: usize,
    pub excused: BTreeMap<&'static str, usize>,
    pub reassigned: usize,
    pub documented_repeats: usize,
    pub resets: BTreeMap<String, usize>,
    pub false_resets: Vec<String>,
    /// Samples (ms) of the time to resume, per fault kind.
    pub resume: BTreeMap<&'static str, Vec<u64>>,
    pub stalls: usize,
    pub stalls_cut: usize,
    pub connections: usize,
    pub opens_refused: usize,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub seed: u64,
    pub violations: Vec<Violation>,
    pub stats: Stats,
}

impl Report {
    pub fn count(&self, kind: VKind) -> usize {
        self.violations.iter().filter(|v| v.kind == kind).count()
    }
}

/// The faults of a run, with the questions the rules ask of them.
struct Faults<'a>(&'a [FaultRecord]);

impl Faults<'_> {
    fn redis_down(&self) -> impl Iterator<Item = &FaultRecord> {
        self.0.iter().filter(|f| f.kind.redis_down())
    }

    /// Redis was unreachable at some moment of [from, to] (with the margin
    /// instances need to notice it is back).
    fn redis_unreachable(&self, from: u64, to: u64) -> bool {
        self.redis_down()
            .any(|f| f.start <= to && from <= f.repaired + REDIS_BACK_MARGIN)
    }

    /// The Redis outage a moment falls in: (start, repaired).
    fn outage_at(&self, t: u64) -> Option<(u64, u64)> {
        self.redis_down()
            .find(|f| f.start <= t && t <= f.repaired + REDIS_BACK_MARGIN)
            .map(|f| (f.start, f.repaired))
    }

    /// Redis may have lost acknowledged data (restarted empty, failed
    /// over) at a moment of [from, to].
    fn lose_restart_within(&self, from: u64, to: u64) -> bool {
        self.0
            .iter()
            .any(|f| f.kind.loses_data() && from <= f.start && f.start <= to)
    }

    /// A flip had the flag off on some instance at some moment of
    /// [from, to].
    fn flag_off(&self, from: u64, to: u64) -> bool {
        self.0.iter().any(|f| {
            f.kind.changes_flag() && f.start <= to && from <= f.repaired + FLAG_FOLLOW_MARGIN
        })
    }

    /// A flip began at most [`LATE_MARGIN`] before `t` (its paths met).
    fn flipped_before(&self, t: u64) -> bool {
        self.0
            .iter()
            .any(|f| f.kind.changes_flag() && f.start <= t && t <= f.repaired + LATE_MARGIN)
    }

    /// Faults whose time (injection to repair, plus `margin`) meets
    /// [from, to], as "kind target #index".
    fn around(&self, from: u64, to: u64, margin: u64) -> Vec<String> {
        self.0
            .iter()
            .filter(|f| f.start <= to + margin && from <= f.repaired + margin)
            .map(|f| format!("{} {} #{}", f.kind.name(), f.target, f.index))
            .collect()
    }
}

/// Where an item sits in a client's log.
#[derive(Debug, Clone, Copy)]
struct At {
    conn: usize,
    item: usize,
}

pub fn check(run: &RunLog) -> Report {
    let mut report = Report {
        seed: run.seed,
        ..Default::default()
    };
    let faults = Faults(&run.faults);
    let st = &mut report.stats;
    for f in &run.faults {
        *st.faults.entry(f.kind.name()).or_default() += 1;
    }
    for p in &run.publishes {
        if p.accepted() {
            st.accepted += 1;
        } else {
            let key = match &p.status {
                Ok(s) => s.to_string(),
                Err(e) => e.clone(),
            };
            *st.refused.entry(key).or_default() += 1;
        }
    }
    let accepted: Vec<&Publish> = run.publishes.iter().filter(|p| p.accepted()).collect();
    let by_label: HashMap<&str, &Publish> =
        accepted.iter().map(|p| (p.label.as_str(), *p)).collect();

    // Ids given to two accepted publishes of one session.
    let mut shared_excused: Vec<&str> = Vec::new();
    for s in 0..run.sessions.max(1) {
        let mut by_id: BTreeMap<Id, Vec<&Publish>> = BTreeMap::new();
        for p in accepted.iter().filter(|p| p.session == s) {
            by_id.entry(p.id.unwrap()).or_default().push(p);
        }
        for (id, ps) in by_id.into_iter().filter(|(_, v)| v.len() > 1) {
            let from = ps.iter().map(|p| p.sent).min().unwrap();
            let to = ps.iter().map(|p| p.done).max().unwrap();
            let labels: Vec<&str> = ps.iter().map(|p| p.label.as_str()).collect();
            if faults.lose_restart_within(from, to) {
                shared_excused.extend(labels);
                continue;
            }
            report.violations.push(Violation {
                kind: VKind::SharedId,
                client: format!("session {s}"),
                detail: format!("{} was given to {}", show(id), labels.join(" and ")),
                context: ps
                    .iter()
                    .map(|p| publish_line(p))
                    .collect::<Vec<_>>()
                    .join("\n"),
            });
        }
    }

    // Events some client received from another instance than the one
    // that accepted them: they reached Redis.
    let mut reached_redis: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for client in &run.clients {
        for c in client.conns.iter().filter(|c| c.ok()) {
            for it in &c.items {
                if let ItemKind::Event { label, .. } = &it.kind {
                    if by_label
                        .get(label.as_str())
                        .is_some_and(|p| p.instance.is_some() && p.instance != c.instance)
                    {
                        reached_redis.insert(label.as_str());
                    }
                }
            }
        }
    }

    for client in &run.clients {
        check_client(
            run,
            client,
            &faults,
            &accepted,
            &by_label,
            &shared_excused,
            &reached_redis,
            &mut report,
        );
    }

    // Resume times for the faults that cut streams.
    for f in run
        .faults
        .iter()
        .filter(|f| f.kind.stops_instance() || f.kind == Kind::Stall)
    {
        let mut cut = false;
        for client in &run.clients {
            if f.kind == Kind::Stall && client.name() != f.target {
                continue;
            }
            for (k, c) in client.conns.iter().enumerate() {
                let Some(closed) = c.closed else { continue };
                let affected = match f.kind {
                    Kind::Stall => c.stalled && closed >= f.start && closed <= f.repaired + 10_000,
                    _ => {
                        c.instance.as_deref() == Some(f.target.as_str())
                            && closed >= f.start
                            && closed <= f.repaired + 2_000
                    }
                };
                if !affected || matches!(c.end, Some(End::Stopped)) || !c.ok() {
                    continue;
                }
                cut = true;
                if let Some(next) = client.conns[k + 1..].iter().find(|n| n.ok()) {
                    report
                        .stats
                        .resume
                        .entry(f.kind.name())
                        .or_default()
                        .push(next.connected_at.unwrap().saturating_sub(closed));
                }
            }
        }
        if f.kind == Kind::Stall {
            report.stats.stalls += 1;
            if cut {
                report.stats.stalls_cut += 1;
            }
        }
    }
    report
}

fn publish_line(p: &Publish) -> String {
    format!(
        "publish {} by {} to {} sent +{} answered +{}: {} id {} by {}",
        p.label,
        p.publisher,
        p.target,
        p.sent,
        p.done,
        match &p.status {
            Ok(s) => s.to_string(),
            Err(e) => e.clone(),
        },
        p.id.map_or("-".into(), show),
        p.instance.as_deref().unwrap_or("-")
    )
}

fn conn_line(k: usize, c: &Conn) -> String {
    format!(
        "conn #{k}: opened +{} Last-Event-ID {} -> {} {} connected +{} at {}, closed +{} ({}){}",
        c.opened,
        c.last_event_id.map_or("none".into(), show),
        match &c.status {
            Ok(s) => s.to_string(),
            Err(e) => e.clone(),
        },
        c.instance.as_deref().unwrap_or("-"),
        c.connected_at.map_or("-".into(), |t| t.to_string()),
        c.connected_id.map_or("-".into(), show),
        c.closed.map_or("-".into(), |t| t.to_string()),
        match &c.end {
            Some(e) => format!("{e:?}"),
            None => "-".into(),
        },
        if c.stalled { ", stalled" } else { "" }
    )
}

fn item_line(it: &Item) -> String {
    match &it.kind {
        ItemKind::Event { id, label } => format!("+{} event {} {}", it.t, show(*id), label),
        ItemKind::Reset { id, data, .. } => format!("+{} RESET {} {}", it.t, show(*id), data),
    }
}

/// The client's log around `at`: the connection before, the one the
/// problem is on (items near it, `>>` marking it), the one after.
fn excerpt(client: &ClientLog, at: At) -> String {
    let mut out = String::new();
    let from = at.conn.saturating_sub(1);
    let to = (at.conn + 1).min(client.conns.len().saturating_sub(1));
    for k in from..=to {
        let c = &client.conns[k];
        let _ = writeln!(out, "    {}", conn_line(k, c));
        let (lo, hi) = if k == at.conn {
            (at.item.saturating_sub(6), (at.item + 6).min(c.items.len()))
        } else if k < at.conn {
            (c.items.len().saturating_sub(3), c.items.len())
        } else {
            (0, c.items.len().min(3))
        };
        if lo > 0 {
            let _ = writeln!(out, "      ... {lo} items");
        }
        for (i, it) in c.items.iter().enumerate().take(hi).skip(lo) {
            let mark = if k == at.conn && i == at.item {
                ">>"
            } else {
                "  "
            };
            let _ = writeln!(out, "    {mark}  {}", item_line(it));
        }
        if hi < c.items.len() {
            let _ = writeln!(out, "      ... {} more items", c.items.len() - hi);
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn check_client(
    run: &RunLog,
    client: &ClientLog,
    faults: &Faults,
    accepted: &[&Publish],
    by_label: &HashMap<&str, &Publish>,
    shared_excused: &[&str],
    reached_redis: &std::collections::HashSet<&str>,
    report: &mut Report,
) {
    let name = client.name();
    let st = &mut report.stats;
    st.connections += client.conns.iter().filter(|c| c.ok()).count();
    st.opens_refused += client
        .conns
        .iter()
        .filter(|c| matches!(c.status, Ok(s) if s != 200))
        .count();
    let Some(first) = client.conns.iter().position(Conn::ok) else {
        return;
    };
    let p0 = client.conns[first].connected_id.unwrap();
    let t0 = client.conns[first].connected_at.unwrap();
    let mut violations = Vec::new();

    // Positions over the client's whole life.
    let mut pos = p0;
    let mut pos_t = t0;
    let mut received: HashMap<&str, Vec<(At, Id, u64)>> = HashMap::new();
    let mut resets: Vec<(At, Id, u64)> = Vec::new();
    // For each connection: the position the client stood at, and since
    // when, when it opened (for reset causes).
    let mut stood: Vec<(Id, u64)> = vec![(p0, t0); client.conns.len()];
    for (k, c) in client.conns.iter().enumerate() {
        stood[k] = (pos, pos_t);
        if !c.ok() {
            continue;
        }
        for (i, it) in c.items.iter().enumerate() {
            let at = At { conn: k, item: i };
            match &it.kind {
                ItemKind::Event { id, label } => {
                    let again = received.get(label.as_str()).is_some_and(|v| !v.is_empty());
                    received
                        .entry(label.as_str())
                        .or_default()
                        .push((at, *id, it.t));
                    if *id <= pos {
                        if !again {
                            violations.push(Violation {
                                kind: VKind::OutOfOrder,
                                client: name.clone(),
                                detail: format!(
                                    "{label} {} arrived at position {}",
                                    show(*id),
                                    show(pos)
                                ),
                                context: excerpt(client, at),
                            });
                        }
                    } else {
                        pos = *id;
                        pos_t = it.t;
                    }
                }
                ItemKind::Reset { id, .. } => {
                    resets.push((at, *id, it.t));
                    if *id < pos {
                        violations.push(Violation {
                            kind: VKind::OutOfOrder,
                            client: name.clone(),
                            detail: format!(
                                "a reset moved the position back from {} to {}",
                                show(pos),
                                show(*id)
                            ),
                            context: excerpt(client, at),
                        });
                    }
                    pos = *id;
                    pos_t = it.t;
                }
            }
        }
    }

    // Repeats and ids.
    for (label, got) in &received {
        let Some(p) = by_label.get(label) else {
            continue;
        };
        let id = p.id.unwrap();
        if !got.iter().any(|(_, g, _)| *g == id) {
            if is_local(id) {
                st.reassigned += 1;
            } else {
                violations.push(Violation {
                    kind: VKind::WrongId,
                    client: name.clone(),
                    detail: format!(
                        "{label} accepted as {} arrived as {}",
                        show(id),
                        got.iter().map(|g| show(g.1)).collect::<Vec<_>>().join(", ")
                    ),
                    context: format!("{}\n{}", excerpt(client, got[0].0), publish_line(p)),
                });
            }
        }
        if got.len() > 1 {
            let mut ids: Vec<Id> = got.iter().map(|g| g.1).collect();
            ids.sort();
            ids.dedup();
            let in_outage = faults.redis_unreachable(p.sent, p.done);
            if ids.len() == got.len() && in_outage {
                st.documented_repeats += 1;
            } else {
                violations.push(Violation {
                    kind: VKind::Duplicated,
                    client: name.clone(),
                    detail: format!(
                        "{label} arrived {} times (as {})",
                        got.len(),
                        got.iter().map(|g| show(g.1)).collect::<Vec<_>>().join(", ")
                    ),
                    context: format!(
                        "{}{}\n    faults around the publish: {:?}",
                        excerpt(client, got[1].0),
                        publish_line(p),
                        faults.around(p.sent, p.done, 1_000)
                    ),
                });
            }
        }
    }

    // Owed events.
    let first_conn = &client.conns[first];
    let first_unreadable = faults.redis_unreachable(first_conn.opened, t0);
    let timeline: Vec<(At, &Item)> = client
        .conns
        .iter()
        .enumerate()
        .filter(|(_, c)| c.ok())
        .flat_map(|(k, c)| {
            c.items
                .iter()
                .enumerate()
                .map(move |(i, it)| (At { conn: k, item: i }, it))
        })
        .collect();
    for p in accepted.iter().filter(|p| p.session == client.session) {
        let e = p.id.unwrap();
        if e <= p0 {
            continue;
        }
        let excuse = |rule: Rule, st: &mut Stats| {
            *st.excused.entry(rule.name()).or_default() += 1;
        };
        if p.done < t0 && first_unreadable && !received.contains_key(p.label.as_str()) {
            excuse(Rule::ConnectedWhileRedisUnreadable, st);
            continue;
        }
        st.owed += 1;
        if received.contains_key(p.label.as_str()) {
            st.received += 1;
            continue;
        }
        // Whether the client streamed from the instance that accepted it
        // while the publish ran.
        let own = client.conns.iter().any(|c| {
            c.ok()
                && c.opened <= p.done
                && c.closed.is_none_or(|t| t >= p.sent)
                && c.instance.is_some()
                && c.instance == p.instance
        });
        if is_local(e) {
            if let Some(instance) = &p.instance {
                let back = faults.outage_at(p.done).map_or(p.done, |(_, back)| back);
                // The process that answered stopped before `until`: its
                // stop began by then and ended (the restart) after the
                // publish was sent. A SIGTERM can come before the publish:
                // a draining instance still answers until it exits. Later,
                // while its client is still reconnecting ("Redis down or
                // already back: the outbox is in memory"), only for an
                // event no other instance ever delivered: it never left.
                let stopped_by = |until: u64| {
                    run.faults.iter().any(|f| {
                        f.kind.stops_instance()
                            && f.target == *instance
                            && f.start <= until
                            && f.repaired >= p.sent
                    })
                };
                let stopped = stopped_by(back + OUTBOX_FLUSH_MARGIN)
                    || (!reached_redis.contains(p.label.as_str())
                        && stopped_by(back + OUTBOX_RECONNECT_MARGIN));
                if stopped {
                    excuse(Rule::OutboxOfStoppedInstance, st);
                    continue;
                }
            }
        }
        // After the outbox rule: an event both rules fit is counted where
        // the cause is certain.
        if is_local(e) && !own && faults.flag_off(p.sent, p.done) {
            excuse(Rule::FlagOffOnItsInstance, st);
            continue;
        }
        // Only the publishing instance's own clients, for an event that
        // reached Redis (a sequence id) while Redis was killed empty.
        if own
            && !is_local(e)
            && faults.lose_restart_within(p.sent.saturating_sub(100), p.done + 100)
        {
            excuse(Rule::OwnEventRacedLostConnection, st);
            continue;
        }
        if shared_excused.contains(&p.label.as_str()) {
            excuse(Rule::IdReusedAfterEmptyRestart, st);
            continue;
        }
        // Where the gap is: the first item that moved the client past e.
        let past = timeline.iter().find(|(_, it)| match &it.kind {
            ItemKind::Event { id, .. } => *id > e,
            ItemKind::Reset { id, .. } => *id >= e,
        });
        let Some((at, item)) = past else {
            let last = timeline.last().map(|(at, _)| *at).unwrap_or(At {
                conn: first,
                item: 0,
            });
            violations.push(Violation {
                kind: VKind::Lost,
                client: name.clone(),
                detail: format!(
                    "{} {} never arrived; the client never got past it (last position {})",
                    p.label,
                    show(e),
                    show(pos)
                ),
                context: format!(
                    "{}    {}\n    faults around the publish: {:?}",
                    excerpt(client, last),
                    publish_line(p),
                    faults.around(p.sent, p.done, 5_000)
                ),
            });
            continue;
        };
        if matches!(item.kind, ItemKind::Reset { .. }) {
            st.covered_by_reset += 1;
            continue;
        }
        // A reset later on the same connection at or past e: the late
        // event was replaced by an `out_of_order` reset there.
        let later_here = resets
            .iter()
            .any(|(r_at, r, _)| r_at.conn == at.conn && r_at.item > at.item && *r >= e);
        if later_here {
            st.covered_by_reset += 1;
            continue;
        }
        // The stream the gap is on ended before the late event (or its
        // `out_of_order` reset) reached it, and the very next thing the
        // client got, first on its next connection, is a reset at or past
        // e: the client is told before it sees anything else, as it would
        // have been at the end of that stream.
        let next_ok = client.conns[at.conn + 1..]
            .iter()
            .position(|c| c.ok() && !c.items.is_empty())
            .map(|k| k + at.conn + 1);
        let next_told = next_ok.is_some_and(
            |k| matches!(client.conns[k].items[0].kind, ItemKind::Reset { id, .. } if id >= e),
        );
        if next_told {
            st.covered_by_reset += 1;
            st.covered_on_next_connection += 1;
            continue;
        }
        let later_elsewhere = resets
            .iter()
            .find(|(r_at, r, _)| r_at.conn > at.conn && *r >= e)
            .map(|(r_at, r, t)| {
                format!(
                    "; a reset {} came only later, on conn #{} at +{t}",
                    show(*r),
                    r_at.conn
                )
            })
            .unwrap_or_default();
        let conn = &client.conns[at.conn];
        let resume_seam = at.item == 0 && conn.last_event_id.is_some();
        let (kind, what) = if resume_seam {
            (
                VKind::SilentGap,
                format!(
                    "the resume from {} on {} went on with {} and skipped {} {}",
                    conn.last_event_id.map_or("-".into(), show),
                    conn.instance.as_deref().unwrap_or("-"),
                    item_line(item),
                    p.label,
                    show(e)
                ),
            )
        } else {
            (
                VKind::Lost,
                format!(
                    "{} {} never arrived; the stream on {} went past it with {}",
                    p.label,
                    show(e),
                    conn.instance.as_deref().unwrap_or("-"),
                    item_line(item)
                ),
            )
        };
        violations.push(Violation {
            kind,
            client: name.clone(),
            detail: format!("{what}{later_elsewhere}"),
            context: format!(
                "{}    {}\n    faults around the publish: {:?}",
                excerpt(client, *at),
                publish_line(p),
                faults.around(p.sent, p.done, 5_000)
            ),
        });
    }

    // Resets: the documented cause of each, or a false reset.
    let session_events: Vec<&&Publish> = accepted
        .iter()
        .filter(|p| p.session == client.session)
        .collect();
    for (at, r, t) in &resets {
        let conn = &client.conns[at.conn];
        let item = &conn.items[at.item];
        let ItemKind::Reset { reason, .. } = &item.kind else {
            unreachable!()
        };
        let resume = at.item == 0 && conn.last_event_id.is_some();
        let cause = if resume {
            let l = conn.last_event_id.unwrap();
            let (_, since) = stood[at.conn];
            let behind: Vec<&&&Publish> = session_events
                .iter()
                .filter(|p| p.id.unwrap() > l && p.done <= *t)
                .collect();
            let bytes: usize = behind.iter().map(|p| p.bytes).sum();
            if faults.lose_restart_within(since.saturating_sub(REDIS_BACK_MARGIN), *t) {
                Some("Redis lost data (restarted empty, failed over) since the client's id")
            } else if faults.redis_unreachable(conn.opened, *t) {
                Some("Redis unreachable when the resume read history")
            } else if is_local(l) {
                Some("resume from a local (outbox or flag-off) id")
            } else if bytes > run.replay_max_bytes {
                Some("more than REPLAY_MAX_BYTES behind")
            } else if behind.len() > HISTORY_MAXLEN {
                Some("more than HISTORY_MAXLEN behind")
            } else {
                None
            }
        } else if reason.as_deref() == Some("history_gap")
            && faults.lose_restart_within(stood[at.conn].1.saturating_sub(REDIS_BACK_MARGIN), *t)
        {
            // The subscriber's catch-up found the stream no longer holding
            // what it had delivered: whatever else was lost, it cannot know.
            Some("history_gap: Redis lost data since the stream's position")
        } else if reason.as_deref() == Some("out_of_order")
            && faults
                .redis_down()
                .any(|f| f.start <= *t && *t <= f.repaired + LATE_MARGIN)
        {
            Some("out_of_order: a late event after a Redis outage")
        } else if reason.as_deref() == Some("out_of_order") && faults.flipped_before(*t) {
            // The paths of a flip met (docs/delivery.md, "Order").
            Some("out_of_order: a late event after a flag flip")
        } else {
            None
        };
        let key =
            match cause {
                Some(c) => c.to_owned(),
                None => {
                    let (l, since) = stood[at.conn];
                    st.false_resets.push(format!(
                    "{name} conn #{} on {} at +{t}: {} {} (client at {} since +{since}); faults \
                     around: {:?}",
                    at.conn,
                    conn.instance.as_deref().unwrap_or("-"),
                    if resume { "resume reset" } else { "mid-stream reset" },
                    show(*r),
                    show(l),
                    faults.around(since, *t, 2_000)
                ));
                    format!(
                        "false ({})",
                        if resume {
                            "resume".to_owned()
                        } else {
                            format!("mid-stream, {}", reason.as_deref().unwrap_or("no reason"))
                        }
                    )
                }
            };
        *st.resets.entry(key).or_default() += 1;
    }

    // Resume times for Redis faults: after the repair, how long until the
    // client had everything accepted up to it (for pubsub-kill, the longest
    // delay of an event accepted in the 2 s after the kill).
    let recv_time = |label: &str| received.get(label).map(|v| v[0].2);
    for f in &run.faults {
        let (from, to) = match f.kind {
            k if k.redis_down() => (f.start, f.repaired),
            Kind::PubsubKill => (f.start, f.start + 2_000),
            _ => continue,
        };
        let mut worst: Option<u64> = None;
        for p in session_events
            .iter()
            .filter(|p| p.done >= from && p.done <= to)
        {
            if p.id.unwrap() <= p0 {
                continue;
            }
            let Some(t) = recv_time(&p.label) else {
                continue;
            };
            let d = if f.kind == Kind::PubsubKill {
                t.saturating_sub(p.done)
            } else {
                t.saturating_sub(f.repaired)
            };
            worst = Some(worst.map_or(d, |w| w.max(d)));
        }
        if let Some(w) = worst {
            st.resume.entry(f.kind.name()).or_default().push(w);
        }
    }

    report.violations.extend(violations);
}

pub fn percentile(v: &[u64], p: f64) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    Some(s[rank.clamp(1, s.len()) - 1])
}

/// The run's figures as text, and every violation with the seed, the
/// schedule and the client log around it.
pub fn render(run: &RunLog, report: &Report, secs: u64) -> String {
    let st = &report.stats;
    let mut out = String::new();
    let _ = writeln!(out, "chaos seed {}: {} s", report.seed, secs);
    let _ = writeln!(out, "  faults: {:?}", st.faults);
    let _ = writeln!(
        out,
        "  publishes: {} accepted, refused {:?}; client connections {} ({} opens refused)",
        st.accepted, st.refused, st.connections, st.opens_refused
    );
    let _ = writeln!(
        out,
        "  owed (client, event) pairs checked: {}; received {}, covered by a reset {} ({} by the \
         reset opening the next connection); excused by rule {:?}; arrived under a reassigned id \
         {}; documented repeats {}",
        st.owed,
        st.received,
        st.covered_by_reset,
        st.covered_on_next_connection,
        st.excused,
        st.reassigned,
        st.documented_repeats
    );
    let _ = writeln!(out, "  resets by cause: {:?}", st.resets);
    let _ = writeln!(
        out,
        "  stalled clients: {} stalls, {} cut by the server",
        st.stalls, st.stalls_cut
    );
    for (k, v) in &st.resume {
        let _ = writeln!(
            out,
            "  resume {k}: n={} p50={} ms p99={} ms",
            v.len(),
            percentile(v, 50.0).unwrap_or(0),
            percentile(v, 99.0).unwrap_or(0)
        );
    }
    let counts: Vec<String> = VKind::ALL
        .iter()
        .map(|k| format!("{} {}", k.name(), report.count(*k)))
        .collect();
    let _ = writeln!(out, "  violations: {}", counts.join(", "));
    for f in &st.false_resets {
        let _ = writeln!(out, "  false reset: {f}");
    }
    if !report.violations.is_empty() {
        let _ = writeln!(
            out,
            "\nVIOLATIONS (seed {}; replay: CHAOS_SEED={} CHAOS_SECS={} cargo test --test chaos -- --nocapture)\nschedule:\n{}",
            report.seed, report.seed, secs, run.schedule
        );
        for v in report.violations.iter().take(30) {
            let _ = writeln!(
                out,
                "{} {}: {}\n{}",
                v.kind.name(),
                v.client,
                v.detail,
                v.context
            );
        }
        if report.violations.len() > 30 {
            let _ = writeln!(out, "... {} more", report.violations.len() - 30);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(t: u64, ms: u64, label: &str) -> Item {
        Item {
            t,
            kind: ItemKind::Event {
                id: (ms, 0),
                label: label.to_owned(),
            },
        }
    }

    fn reset(t: u64, ms: u64) -> Item {
        Item {
            t,
            kind: ItemKind::Reset {
                id: (ms, 0),
                reason: None,
                late_id: None,
                data: "{}".to_owned(),
            },
        }
    }

    fn conn(opened: u64, last: Option<u64>, at: u64, items: Vec<Item>) -> Conn {
        Conn {
            opened,
            last_event_id: last.map(|ms| (ms, 0)),
            status: Ok(200),
            instance: Some("app1".into()),
            connected_at: Some(opened + 1),
            connected_id: Some((at, 0)),
            items,
            closed: Some(opened + 1000),
            end: Some(End::Eof),
            stalled: false,
        }
    }

    /// Events e1..e6 (ids 101..106, accepted at +10, +20, ...) and a
    /// client whose log is `conns`.
    fn run(conns: Vec<Conn>) -> RunLog {
        let publishes = (1..=6)
            .map(|n| Publish {
                session: 0,
                publisher: "p0".into(),
                label: format!("e{n}"),
                target: "lb".into(),
                sent: n * 10 - 5,
                done: n * 10,
                status: Ok(202),
                id: Some((100 + n, 0)),
                instance: Some("app1".into()),
                bytes: 60,
            })
            .collect();
        RunLog {
            seed: 1,
            schedule: String::new(),
            clients: vec![ClientLog {
                session: 0,
                client: 0,
                conns,
            }],
            publishes,
            faults: Vec::new(),
            replay_max_bytes: REPLAY_MAX_BYTES_TEST,
            sessions: 1,
        }
    }

    const REPLAY_MAX_BYTES_TEST: usize = 4 << 20;

    fn kinds(r: &Report) -> Vec<VKind> {
        r.violations.iter().map(|v| v.kind).collect()
    }

    #[test]
    fn a_clean_log_with_a_covering_reset_passes() {
        // e1, e2 live; the stream breaks; the resume from e2 gets a reset
        // to e4 (e3, e4 covered), then e5, e6.
        let log = run(vec![
            conn(0, None, 100, vec![ev(11, 101, "e1"), ev(21, 102, "e2")]),
            conn(
                30,
                Some(102),
                102,
                vec![reset(41, 104), ev(51, 105, "e5"), ev(61, 106, "e6")],
            ),
        ]);
        let r = check(&log);
        assert!(r.violations.is_empty(), "{}", render(&log, &r, 1));
        assert_eq!(r.stats.owed, 6);
        assert_eq!(r.stats.received, 4);
        assert_eq!(r.stats.covered_by_reset, 2);
        // No fault at all: that reset is a false one, counted, not failed.
        assert_eq!(r.stats.false_resets.len(), 1);
    }

    #[test]
    fn a_planted_loss_is_reported() {
        let log = run(vec![conn(
            0,
            None,
            100,
            vec![
                ev(11, 101, "e1"),
                ev(21, 102, "e2"),
                ev(41, 104, "e4"),
                ev(51, 105, "e5"),
                ev(61, 106, "e6"),
            ],
        )]);
        let r = check(&log);
        assert_eq!(kinds(&r), vec![VKind::Lost], "{}", render(&log, &r, 1));
        assert!(r.violations[0].detail.contains("e3"));
    }

    #[test]
    fn a_loss_after_which_a_reset_comes_only_on_a_later_connection_is_still_lost() {
        let log = run(vec![
            conn(
                0,
                None,
                100,
                vec![ev(11, 101, "e1"), ev(21, 102, "e2"), ev(41, 104, "e4")],
            ),
            conn(45, Some(104), 104, vec![ev(51, 105, "e5")]),
            conn(55, Some(105), 105, vec![reset(60, 106)]),
        ]);
        let r = check(&log);
        assert_eq!(kinds(&r), vec![VKind::Lost], "{}", render(&log, &r, 1));
        assert!(r.violations[0].detail.contains("came only later"));
    }

    #[test]
    fn a_gap_whose_stream_ended_and_whose_resume_opens_with_a_covering_reset_is_covered() {
        // e3 is late (another instance's outbox); the stream on app1 went
        // past it with e4 and was cut before e3 or its reset came; the
        // resume opens with a reset past e3.
        let log = run(vec![
            conn(
                0,
                None,
                100,
                vec![ev(11, 101, "e1"), ev(21, 102, "e2"), ev(41, 104, "e4")],
            ),
            conn(45, Some(104), 104, vec![reset(50, 105), ev(61, 106, "e6")]),
        ]);
        let r = check(&log);
        assert!(r.violations.is_empty(), "{}", render(&log, &r, 1));
        assert_eq!(r.stats.covered_on_next_connection, 1);
    }

    #[test]
    fn a_planted_duplicate_is_reported() {
        let log = run(vec![
            conn(
                0,
                None,
                100,
                vec![ev(11, 101, "e1"), ev(21, 102, "e2"), ev(31, 103, "e3")],
            ),
            conn(
                35,
                Some(103),
                103,
                vec![
                    ev(36, 103, "e3"),
                    ev(41, 104, "e4"),
                    ev(51, 105, "e5"),
                    ev(61, 106, "e6"),
                ],
            ),
        ]);
        let r = check(&log);
        assert_eq!(
            kinds(&r),
            vec![VKind::Duplicated],
            "{}",
            render(&log, &r, 1)
        );
    }

    #[test]
    fn a_planted_reordering_is_reported() {
        let log = run(vec![conn(
            0,
            None,
            100,
            vec![
                ev(11, 101, "e1"),
                ev(31, 103, "e3"),
                ev(32, 102, "e2"),
                ev(41, 104, "e4"),
                ev(51, 105, "e5"),
                ev(61, 106, "e6"),
            ],
        )]);
        let r = check(&log);
        assert_eq!(
            kinds(&r),
            vec![VKind::OutOfOrder],
            "{}",
            render(&log, &r, 1)
        );
        assert!(r.violations[0].detail.contains("e2"));
    }

    #[test]
    fn a_reset_that_moves_the_position_back_is_out_of_order() {
        let log = run(vec![
            conn(
                0,
                None,
                100,
                vec![ev(11, 101, "e1"), ev(21, 102, "e2"), ev(31, 103, "e3")],
            ),
            conn(
                35,
                Some(103),
                103,
                vec![
                    reset(36, 0),
                    ev(41, 104, "e4"),
                    ev(51, 105, "e5"),
                    ev(61, 106, "e6"),
                ],
            ),
        ]);
        let r = check(&log);
        assert_eq!(
            kinds(&r),
            vec![VKind::OutOfOrder],
            "{}",
            render(&log, &r, 1)
        );
    }

    #[test]
    fn a_planted_silent_gap_is_reported() {
        // The resume from e2 answers connected, then e4: e3 skipped.
        let log = run(vec![
            conn(0, None, 100, vec![ev(11, 101, "e1"), ev(21, 102, "e2")]),
            conn(
                35,
                Some(102),
                102,
                vec![ev(36, 104, "e4"), ev(51, 105, "e5"), ev(61, 106, "e6")],
            ),
        ]);
        let r = check(&log);
        assert_eq!(kinds(&r), vec![VKind::SilentGap], "{}", render(&log, &r, 1));
        assert!(r.violations[0].detail.contains("e3"));
    }

    #[test]
    fn an_event_never_reached_at_the_end_is_lost() {
        let log = run(vec![conn(
            0,
            None,
            100,
            vec![
                ev(11, 101, "e1"),
                ev(21, 102, "e2"),
                ev(31, 103, "e3"),
                ev(41, 104, "e4"),
                ev(51, 105, "e5"),
            ],
        )]);
        let r = check(&log);
        assert_eq!(kinds(&r), vec![VKind::Lost], "{}", render(&log, &r, 1));
    }

    /// e3 accepted by app1 under a local id; a client on app2 got every
    /// event but e3.
    fn local_e3_missing_on_app2() -> RunLog {
        let mut log = run(vec![conn(
            0,
            None,
            100,
            vec![
                ev(11, 101, "e1"),
                ev(21, 102, "e2"),
                ev(41, 104, "e4"),
                ev(51, 105, "e5"),
                ev(61, 106, "e6"),
            ],
        )]);
        log.clients[0].conns[0].instance = Some("app2".into());
        log.publishes[2].id = Some((103, LOCAL_SEQ + 7));
        log
    }

    #[test]
    fn an_outbox_event_of_an_instance_killed_before_redis_came_back_may_be_absent() {
        // e3 took a local id on app1 while Redis was down; app1 was killed
        // before Redis came back: documented loss, not a violation. The
        // client was on app2.
        let mut log = local_e3_missing_on_app2();
        log.faults = vec![
            FaultRecord {
                index: 0,
                kind: Kind::RedisHang,
                target: "redis".into(),
                start: 20,
                repaired: 60,
            },
            FaultRecord {
                index: 1,
                kind: Kind::Kill,
                target: "app1".into(),
                start: 35,
                repaired: 80,
            },
        ];
        let r = check(&log);
        assert!(r.violations.is_empty(), "{}", render(&log, &r, 1));
        assert_eq!(
            r.stats.excused.get(Rule::OutboxOfStoppedInstance.name()),
            Some(&1)
        );
        // Without the kill the same absence is a loss.
        log.faults.pop();
        let r = check(&log);
        assert_eq!(kinds(&r), vec![VKind::Lost], "{}", render(&log, &r, 1));
    }

    #[test]
    fn an_outbox_event_of_an_instance_killed_while_its_client_still_reconnected_may_be_absent() {
        // Redis was back at 60, but app1 still held e3 (a local id) in its
        // outbox when it was killed at 4,000, its client still reconnecting:
        // no other instance ever delivered e3, so it never left app1.
        let mut log = local_e3_missing_on_app2();
        log.faults = vec![
            FaultRecord {
                index: 0,
                kind: Kind::RedisHang,
                target: "redis".into(),
                start: 20,
                repaired: 60,
            },
            FaultRecord {
                index: 1,
                kind: Kind::Kill,
                target: "app1".into(),
                start: 4_000,
                repaired: 5_000,
            },
        ];
        let r = check(&log);
        assert!(r.violations.is_empty(), "{}", render(&log, &r, 1));
        assert_eq!(
            r.stats.excused.get(Rule::OutboxOfStoppedInstance.name()),
            Some(&1)
        );
        // Had another instance delivered e3, it reached Redis: this
        // client's absence is a loss.
        let mut other = log.clients[0].clone();
        other.client = 1;
        other.conns[0].instance = Some("app3".into());
        other.conns[0].items.insert(2, ev(31, 103, "e3"));
        log.clients.push(other);
        let r = check(&log);
        assert_eq!(kinds(&r), vec![VKind::Lost], "{}", render(&log, &r, 1));
        // And a kill long after the outage excuses nothing.
        log.clients.pop();
        log.faults[1].start = 20_000;
        log.faults[1].repaired = 21_000;
        let r = check(&log);
        assert_eq!(kinds(&r), vec![VKind::Lost], "{}", render(&log, &r, 1));
    }

    #[test]
    fn an_outbox_event_accepted_while_its_instance_drained_may_be_absent() {
        // SIGTERM reached app1 before e3 was sent; app1 still answered it
        // (draining) under a local id, Redis down, and exited before Redis
        // came back: the outbox went with it, a documented loss.
        let mut log = local_e3_missing_on_app2();
        let term = |start, repaired| FaultRecord {
            index: 1,
            kind: Kind::Term,
            target: "app1".into(),
            start,
            repaired,
        };
        log.faults = vec![
            FaultRecord {
                index: 0,
                kind: Kind::RedisHang,
                target: "redis".into(),
                start: 20,
                repaired: 60,
            },
            term(22, 80),
        ];
        let r = check(&log);
        assert!(r.violations.is_empty(), "{}", render(&log, &r, 1));
        assert_eq!(
            r.stats.excused.get(Rule::OutboxOfStoppedInstance.name()),
            Some(&1)
        );
        // A stop that was over (restarted) before e3 was sent took nothing
        // of it with it.
        log.faults[1] = term(10, 24);
        let r = check(&log);
        assert_eq!(kinds(&r), vec![VKind::Lost], "{}", render(&log, &r, 1));
    }

    #[test]
    fn a_flag_off_event_may_be_absent_only_for_clients_of_other_instances() {
        // e3 took a local id on app1 while a flip had the flag off, Redis
        // up: a client on app2 may lack it, a client on app1 may not.
        let mut log = local_e3_missing_on_app2();
        log.faults = vec![FaultRecord {
            index: 0,
            kind: Kind::FlagFlip,
            target: "unleash".into(),
            start: 20,
            repaired: 40,
        }];
        let r = check(&log);
        assert!(r.violations.is_empty(), "{}", render(&log, &r, 1));
        assert_eq!(
            r.stats.excused.get(Rule::FlagOffOnItsInstance.name()),
            Some(&1)
        );
        log.clients[0].conns[0].instance = Some("app1".into());
        let r = check(&log);
        assert_eq!(kinds(&r), vec![VKind::Lost], "{}", render(&log, &r, 1));
        // Long after the flip, the same absence is a loss anywhere.
        log.clients[0].conns[0].instance = Some("app2".into());
        log.faults[0].start = 1;
        log.faults[0].repaired = 2;
        log.publishes[2].sent = 10_000;
        log.publishes[2].done = 10_005;
        let r = check(&log);
        assert_eq!(kinds(&r), vec![VKind::Lost], "{}", render(&log, &r, 1));
    }
}
