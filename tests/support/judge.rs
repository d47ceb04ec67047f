//! The stream judge shared by the delivery tests: event ids as numbers,
//! what a stream delivered (`Got`), and the check that every accepted event
//! a stream is owed arrived exactly once in increasing id order or is
//! covered by a `reset` whose id is at or past its own.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};

use serde_json::Value;

use super::SseEvent;

/// An event id as the pair of numbers it stands for.
pub type Id = (u64, u64);

pub fn parse_id(id: &str) -> Id {
    let (ms, seq) = id
        .split_once('-')
        .unwrap_or_else(|| panic!("not an event id: {id:?}"));
    (
        ms.parse()
            .unwrap_or_else(|_| panic!("not an event id: {id:?}")),
        seq.parse()
            .unwrap_or_else(|_| panic!("not an event id: {id:?}")),
    )
}

pub fn show(id: Id) -> String {
    format!("{}-{}", id.0, id.1)
}

/// A publish the server accepted: its label (the event's data) and the id
/// the 202 named.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub label: String,
    pub id: Id,
}

/// What a stream delivered after `connected`.
#[derive(Debug, Clone)]
pub enum Got {
    Event {
        label: String,
        id: Id,
    },
    /// The id it carries (its `id:` line; the data's `last_event_id` if it
    /// has none), and the block as it arrived.
    Reset {
        id: Id,
        raw: String,
    },
    /// The stream ended.
    End,
}

pub fn got_of(block: &SseEvent) -> Option<Got> {
    match block.event.as_deref() {
        None | Some("connected") => None,
        Some("reset") => {
            let data: Value = serde_json::from_str(block.data.as_deref().unwrap_or("null"))
                .unwrap_or(Value::Null);
            let id = block
                .id
                .clone()
                .or_else(|| data["last_event_id"].as_str().map(str::to_owned))
                .map(|i| parse_id(&i))
                .unwrap_or((0, 0));
            Some(Got::Reset {
                id,
                raw: block.raw.clone(),
            })
        }
        Some(ty) => {
            let data = block.json();
            let label = data
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| format!("{ty}:{data}"));
            let id = block
                .id
                .as_deref()
                .map(parse_id)
                .unwrap_or_else(|| panic!("event without an id: {:?}", block.raw));
            Some(Got::Event { label, id })
        }
    }
}

/// At most this many examples per kind of problem in a message.
pub const EXAMPLES: usize = 6;

/// What one stream got, judged against what it is owed.
///
/// - `owed`: the accepted events it must receive (unless a reset covers
///   them), the last one being the marker;
/// - `seen_before`: labels the client already had before this stream (a
///   resume): receiving one again is a repeat;
/// - `reset_first_excuses`: for a resume, a `reset` as its very first
///   event means "reload", and nothing of the replay is owed.
pub fn judge(
    who: &str,
    got: &[Got],
    owed: &[Accepted],
    seen_before: &HashSet<String>,
    reset_first_excuses: bool,
) -> Result<String, String> {
    // A missing event whose id another accepted event also got is named
    // with it.
    let mut twins: BTreeMap<Id, Vec<&str>> = BTreeMap::new();
    for a in owed {
        twins.entry(a.id).or_default().push(&a.label);
    }
    let mut problems = Vec::new();
    let mut counts: BTreeMap<&str, (usize, Id)> = BTreeMap::new();
    let mut order = Vec::new();
    let mut repeats = Vec::new();
    let mut resets = 0;
    let mut last_reset: Option<Id> = None;
    let mut position: Option<Id> = None;
    let mut ended = false;
    for g in got {
        match g {
            Got::Event { label, id } => {
                if seen_before.contains(label) {
                    repeats.push(format!("{label} (now as {})", show(*id)));
                }
                let entry = counts.entry(label.as_str()).or_insert((0, *id));
                entry.0 += 1;
                if let Some(p) = position {
                    if *id <= p {
                        order.push(format!("{label} {} after {}", show(*id), show(p)));
                    }
                }
                position = Some(position.map_or(*id, |p| p.max(*id)));
            }
            Got::Reset { id, .. } => {
                resets += 1;
                last_reset = Some(last_reset.map_or(*id, |r| r.max(*id)));
                position = Some(position.map_or(*id, |p| p.max(*id)));
            }
            Got::End => ended = true,
        }
    }
    let excused = reset_first_excuses && matches!(got.first(), Some(Got::Reset { .. }));
    let doubled: Vec<String> = counts
        .iter()
        .filter(|(_, (n, _))| *n > 1)
        .map(|(l, (n, id))| format!("{l} x{n} (first as {})", show(*id)))
        .collect();
    let mut missing = Vec::new();
    let mut covered = 0;
    let mut received = 0;
    for a in owed {
        if counts.contains_key(a.label.as_str()) {
            received += 1;
        } else if excused || last_reset.is_some_and(|r| a.id <= r) {
            covered += 1;
        } else {
            let others: Vec<&str> = twins[&a.id]
                .iter()
                .copied()
                .filter(|l| *l != a.label)
                .collect();
            if others.is_empty() {
                missing.push(format!("{} {}", a.label, show(a.id)));
            } else {
                missing.push(format!(
                    "{} {} (id also given to {})",
                    a.label,
                    show(a.id),
                    others.join(", ")
                ));
            }
        }
    }
    if !missing.is_empty() {
        problems.push(format!(
            "{} of {} owed events never arrived and no reset covers them (last reset id: {}): {}",
            missing.len(),
            owed.len(),
            last_reset.map_or("none".to_owned(), show),
            examples(&missing)
        ));
    }
    if !doubled.is_empty() {
        problems.push(format!(
            "{} events arrived more than once: {}",
            doubled.len(),
            examples(&doubled)
        ));
    }
    if !repeats.is_empty() {
        problems.push(format!(
            "{} events the client had already seen arrived again: {}",
            repeats.len(),
            examples(&repeats)
        ));
    }
    if !order.is_empty() {
        problems.push(format!(
            "{} events arrived at or below the stream's position: {}",
            order.len(),
            examples(&order)
        ));
    }
    if ended {
        problems.push("the stream ended".to_owned());
    }
    let first: Vec<String> = got
        .iter()
        .take(4)
        .map(|g| match g {
            Got::Event { label, id } => format!("{label}@{}", show(*id)),
            Got::Reset { raw, .. } => format!("reset[{}]", raw.replace('\n', " | ")),
            Got::End => "end".to_owned(),
        })
        .collect();
    let summary = format!(
        "{who}: {received}/{} owed received, {covered} covered by a reset, {resets} resets, \
         {} blocks in all, first: [{}]",
        owed.len(),
        got.len(),
        first.join(", ")
    );
    if problems.is_empty() {
        Ok(summary)
    } else {
        Err(format!("{summary}\n    - {}", problems.join("\n    - ")))
    }
}

/// Accepted events that were given the same id as another one.
/// The first [`EXAMPLES`] of `items`, for a failure message.
pub fn examples(items: &[String]) -> String {
    items
        .iter()
        .take(EXAMPLES)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn shared_ids(all: &[&Accepted]) -> Vec<String> {
    let mut by_id: BTreeMap<Id, Vec<&str>> = BTreeMap::new();
    for a in all {
        by_id.entry(a.id).or_default().push(&a.label);
    }
    by_id
        .into_iter()
        .filter(|(_, labels)| labels.len() > 1)
        .map(|(id, labels)| format!("{} <- {}", show(id), labels.join(" & ")))
        .collect()
}

/// Panics with every problem found; otherwise prints what was seen (shown
/// with `--nocapture`).
pub fn fail_if_any(test: &str, failures: &[String], context: &str) {
    if !failures.is_empty() {
        panic!(
            "{test}: {} problem(s)\n  {}\n  ({context})",
            failures.len(),
            failures.join("\n  ")
        );
    }
    println!("{test}: ok ({context})");
}
