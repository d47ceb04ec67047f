//! The nemesis: which faults exist, and the schedule of one run, drawn from
//! the seed before anything starts so that the same seed replays the same
//! faults at the same moments against the same targets. Carrying them out
//! is the driver's (it owns the processes).

use std::fmt::Write as _;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

/// Every fault this run can inject. The table [`Kind::table`] prints is
/// the list; nothing else is done to the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// SIGKILL an instance; start it again on the same port after `dur`.
    Kill,
    /// SIGTERM an instance (it drains: unready, streams closed with a
    /// retry hint, outbox flushed); start it again `dur` after it exited.
    Term,
    /// Cut one instance's link to Redis (one server) for `dur`: a
    /// partition between the two, the balancer still reaching the
    /// instance. Nothing is reset; held bytes flow when it heals.
    Partition,
    /// Slow one instance's link to Redis (one server) for `dur`: every byte
    /// arrives [`latency_ms`] later each way, some past the 1 s response
    /// timeout.
    Latency,
    /// Cut the balancer's link to one instance for `dur`: streams through
    /// it fall silent, its health checks fail; publishers that post to the
    /// instance directly still reach it.
    LbPartition,
    /// SIGKILL redis-server, delete its data, start it empty after `dur`.
    RedisLose,
    /// SIGTERM redis-server (its append-only file is complete on exit),
    /// start it again with its data after `dur`.
    RedisKeep,
    /// SIGSTOP redis-server for `dur`, then SIGCONT: a hung Redis, whose
    /// connections stay open and answer nothing.
    RedisHang,
    /// `CLIENT KILL TYPE pubsub`: every instance's subscriber (and control
    /// bus) connection is cut at once; Redis itself stays up.
    PubsubKill,
    /// One client stops reading its stream for `dur` while large events
    /// are published to its session; then it reads its backlog, and
    /// resumes if the server cut it meanwhile.
    Stall,
    /// Behind Sentinel: SIGKILL the primary; the sentinels promote its
    /// replica (replication is asynchronous: the last events may be lost);
    /// the old primary comes back `dur` after the promotion and rejoins as
    /// a replica. In a cluster: the same for one of the three primaries.
    Failover,
    /// In a cluster: move the hash slot of one session (its history and
    /// channel) to another primary, keys and all, under traffic.
    SlotMove,
    /// In a cluster: SIGKILL a primary and its replica, so no failover is
    /// possible and the cluster is down (`cluster-require-full-coverage`,
    /// Redis's default); both start again after `dur`, the shard empty
    /// (the nodes keep no data on disk).
    ShardDown,
    /// Switch the flag off in Unleash for `dur`, then on again. The
    /// instances poll Unleash every second, each at its own moment, so for
    /// about a second each way they disagree: the split window of every
    /// real flip (docs/migration.md).
    FlagFlip,
    /// Lower the flag's rollout in Unleash to 50 % of sessions for `dur`,
    /// then back to 100 %: the sessions outside it switch off and on, the
    /// others stay on.
    FlagRollout,
}

pub const KINDS: [Kind; 15] = [
    Kind::Kill,
    Kind::Term,
    Kind::Partition,
    Kind::Latency,
    Kind::LbPartition,
    Kind::RedisLose,
    Kind::RedisKeep,
    Kind::RedisHang,
    Kind::PubsubKill,
    Kind::Stall,
    Kind::Failover,
    Kind::SlotMove,
    Kind::ShardDown,
    Kind::FlagFlip,
    Kind::FlagRollout,
];

/// The kinds a run over one `redis-server` draws from.
pub const SINGLE_KINDS: [Kind; 12] = [
    Kind::Kill,
    Kind::Term,
    Kind::Partition,
    Kind::Latency,
    Kind::LbPartition,
    Kind::RedisLose,
    Kind::RedisKeep,
    Kind::RedisHang,
    Kind::PubsubKill,
    Kind::Stall,
    Kind::FlagFlip,
    Kind::FlagRollout,
];

/// The kinds a run behind Sentinel draws from (restarts of one server
/// are the failover's there).
pub const SENTINEL_KINDS: [Kind; 8] = [
    Kind::Kill,
    Kind::Term,
    Kind::LbPartition,
    Kind::Failover,
    Kind::PubsubKill,
    Kind::Stall,
    Kind::FlagFlip,
    Kind::FlagRollout,
];

/// The kinds a run over a cluster draws from.
pub const CLUSTER_KINDS: [Kind; 10] = [
    Kind::Kill,
    Kind::Term,
    Kind::LbPartition,
    Kind::Failover,
    Kind::SlotMove,
    Kind::ShardDown,
    Kind::PubsubKill,
    Kind::Stall,
    Kind::FlagFlip,
    Kind::FlagRollout,
];

impl Kind {
    /// The kind named `name` (as [`Kind::name`] spells it).
    pub fn parse(name: &str) -> Option<Kind> {
        KINDS.into_iter().find(|k| k.name() == name.trim())
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Kill => "kill",
            Kind::Term => "term",
            Kind::Partition => "redis-partition",
            Kind::Latency => "redis-latency",
            Kind::LbPartition => "lb-partition",
            Kind::RedisLose => "redis-restart-lose",
            Kind::RedisKeep => "redis-restart-keep",
            Kind::RedisHang => "redis-hang",
            Kind::PubsubKill => "pubsub-kill",
            Kind::Stall => "client-stall",
            Kind::Failover => "redis-failover",
            Kind::SlotMove => "slot-move",
            Kind::ShardDown => "shard-down",
            Kind::FlagFlip => "flag-flip",
            Kind::FlagRollout => "flag-rollout",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Kind::Kill => "SIGKILL an instance, restart it on its port after the duration",
            Kind::Term => "SIGTERM an instance (drain), restart it the duration after it exited",
            Kind::Partition => {
                "one server: cut one instance's link to Redis (silence, no reset), heal it after the duration"
            }
            Kind::Latency => {
                "one server: 150, 400, 800 or 1500 ms more each way on one instance's link to Redis for the duration"
            }
            Kind::LbPartition => {
                "cut the balancer's link to one instance (silence, no reset), heal it after the duration"
            }
            Kind::RedisLose => "SIGKILL redis-server, delete its data, restart it empty",
            Kind::RedisKeep => {
                "SIGTERM redis-server (append-only file kept), restart with its data"
            }
            Kind::RedisHang => "SIGSTOP redis-server for the duration, then SIGCONT",
            Kind::PubsubKill => "CLIENT KILL TYPE pubsub (every subscriber connection cut)",
            Kind::Stall => "a client stops reading while 3 MB of 32 kB events go to its session",
            Kind::Failover => {
                "Sentinel or cluster: SIGKILL a primary; its replica is promoted; the old one rejoins the duration after"
            }
            Kind::SlotMove => {
                "cluster only: move one session's hash slot, keys and all, to another primary"
            }
            Kind::ShardDown => {
                "cluster only: SIGKILL a primary and its replica (no failover: the cluster is down); both restart empty after the duration"
            }
            Kind::FlagFlip => {
                "Unleash: switch the flag off, and on again after the duration (instances poll every second)"
            }
            Kind::FlagRollout => {
                "Unleash: the rollout down to 50 % of sessions, back to 100 % after the duration"
            }
        }
    }

    /// Range of the fault's duration, in ms (0: instant).
    fn durations(self) -> (u64, u64) {
        match self {
            Kind::Kill => (1_000, 4_000),
            Kind::Term => (500, 3_000),
            Kind::Partition | Kind::LbPartition => (1_000, 6_000),
            Kind::Latency => (2_000, 8_000),
            Kind::RedisLose | Kind::RedisKeep => (1_000, 5_000),
            Kind::RedisHang => (1_500, 5_000),
            Kind::PubsubKill => (0, 0),
            Kind::Stall => (5_000, 9_000),
            Kind::Failover => (1_000, 5_000),
            Kind::SlotMove => (0, 0),
            Kind::ShardDown => (2_000, 8_000),
            Kind::FlagFlip | Kind::FlagRollout => (2_000, 6_000),
        }
    }

    /// How long past its duration the fault keeps its target busy (the
    /// repair itself: a drain, a start), so the schedule does not plan a
    /// second fault on a target that is still being repaired.
    fn repair_ms(self) -> u64 {
        match self {
            Kind::Kill => 2_000,
            Kind::Term => 6_000,
            // The outbox flush, the subscriber's catch-up.
            Kind::Partition | Kind::Latency => 3_000,
            // Health checks mark the instance up again.
            Kind::LbPartition => 3_000,
            Kind::RedisLose | Kind::RedisKeep | Kind::RedisHang => 2_000,
            Kind::PubsubKill => 1_000,
            Kind::Stall => 3_000,
            // The promotion (about 2-4 s) and the old primary's rejoining
            // (Sentinel reconfigures it about 10 s after it is back).
            Kind::Failover => 20_000,
            Kind::SlotMove => 5_000,
            // Two nodes rejoining, the replica's full sync.
            Kind::ShardDown => 10_000,
            // Every instance has polled the switch back on.
            Kind::FlagFlip | Kind::FlagRollout => 3_000,
        }
    }

    /// What the fault acts on: one instance, Redis, or one client.
    fn resource(self) -> Resource {
        match self {
            Kind::Kill | Kind::Term | Kind::Partition | Kind::Latency | Kind::LbPartition => {
                Resource::Instance
            }
            Kind::RedisLose
            | Kind::RedisKeep
            | Kind::RedisHang
            | Kind::PubsubKill
            | Kind::Failover
            | Kind::SlotMove
            | Kind::ShardDown => Resource::Redis,
            Kind::Stall => Resource::Client,
            Kind::FlagFlip | Kind::FlagRollout => Resource::Flag,
        }
    }

    /// Whether the fault makes Redis unreachable while it lasts.
    pub fn redis_down(self) -> bool {
        matches!(
            self,
            // For the partitioned instance only; the checker's rules take
            // it for all (a little more lenient for the others).
            Kind::Partition
                | Kind::Latency
                | Kind::RedisLose
                | Kind::RedisKeep
                | Kind::RedisHang
                | Kind::Failover
                | Kind::ShardDown
                // Publishes to a migrating slot are refused (`TRYAGAIN`)
                // and go to the outbox.
                | Kind::SlotMove
        )
    }

    /// Whether the fault can make Redis lose acknowledged data.
    pub fn loses_data(self) -> bool {
        matches!(self, Kind::RedisLose | Kind::Failover | Kind::ShardDown)
    }

    /// Whether the fault switches the flag (off for some sessions, then
    /// on again).
    pub fn changes_flag(self) -> bool {
        matches!(self, Kind::FlagFlip | Kind::FlagRollout)
    }

    /// Whether the fault stops an instance.
    pub fn stops_instance(self) -> bool {
        matches!(self, Kind::Kill | Kind::Term)
    }

    /// The table of fault kinds a run prints.
    pub fn table() -> String {
        let mut out = String::from("| fault | what | duration |\n|---|---|---|\n");
        for k in KINDS {
            let (lo, hi) = k.durations();
            let dur = if hi == 0 {
                "instant".to_owned()
            } else {
                format!("{:.1}–{:.1} s", lo as f64 / 1000.0, hi as f64 / 1000.0)
            };
            let _ = writeln!(out, "| {} | {} | {dur} |", k.name(), k.what());
        }
        out
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resource {
    Instance,
    Redis,
    Client,
    Flag,
}

impl Resource {
    /// Whether the resource is one thing (faults on it never overlap),
    /// not one of several targets.
    fn single(self) -> bool {
        matches!(self, Resource::Redis | Resource::Flag)
    }
}

/// One planned fault.
#[derive(Debug, Clone)]
pub struct Fault {
    pub index: usize,
    /// When to inject it, ms after the run began.
    pub at: u64,
    pub kind: Kind,
    /// Instance index (Kill, Term), client index (Stall), or 0 (Redis, the flag).
    pub target: usize,
    pub dur: u64,
}

impl Fault {
    fn busy_until(&self) -> u64 {
        self.at + self.dur + self.kind.repair_ms()
    }
}

/// The latency a [`Kind::Latency`] fault adds, by its index in the
/// schedule.
pub fn latency_ms(index: usize) -> u64 {
    [150, 400, 800, 1_500][index % 4]
}

/// At most this many instances are down at once, so that clients and
/// publishers always have somewhere to go.
pub const MAX_INSTANCES_DOWN: usize = 2;

/// Draws the schedule of a run of `secs` seconds over `instances`
/// instances and `clients` clients. Faults start from 3 s in and stop
/// being planned 3 s before the end; every kind appears at least once when
/// the run is long enough, in an order the seed decides, then kinds are
/// drawn at random. Faults on different targets overlap freely; two faults
/// on one target (an instance, Redis, a client) never do.
pub fn schedule(
    rng: &mut StdRng,
    secs: u64,
    instances: usize,
    clients: usize,
    kinds: &[Kind],
) -> Vec<Fault> {
    let end = secs * 1000;
    let last_start = end.saturating_sub(3_000);
    let mut first: Vec<Kind> = kinds.to_vec();
    first.shuffle(rng);
    let mut faults: Vec<Fault> = Vec::new();
    let mut t = 3_000;
    // A new fault every 1.5-5 s on average over the run.
    while t < last_start {
        let from_first = !first.is_empty();
        let kind = if from_first {
            first.remove(0)
        } else {
            kinds[rng.gen_range(0..kinds.len())]
        };
        let (lo, hi) = kind.durations();
        let dur = if hi == 0 { 0 } else { rng.gen_range(lo..=hi) };
        let targets = match kind.resource() {
            Resource::Instance => instances,
            Resource::Redis | Resource::Flag => 1,
            Resource::Client => clients,
        };
        let target = rng.gen_range(0..targets);
        let candidate = Fault {
            index: 0,
            at: t,
            kind,
            target,
            dur,
        };
        if fits(&faults, &candidate) {
            faults.push(candidate);
        } else if from_first {
            // Its target is busy: it is tried again at the next moment, so
            // every kind still comes once early.
            first.insert(0, kind);
        }
        t += rng.gen_range(1_500..=5_000);
    }
    for (i, f) in faults.iter_mut().enumerate() {
        f.index = i;
    }
    faults
}

fn fits(planned: &[Fault], new: &Fault) -> bool {
    let overlaps = |f: &Fault| f.at < new.busy_until() && new.at < f.busy_until();
    let res = new.kind.resource();
    let same_target = planned
        .iter()
        .filter(|f| f.kind.resource() == res && (res.single() || f.target == new.target))
        .any(overlaps);
    if same_target {
        return false;
    }
    if res == Resource::Instance {
        let down = planned
            .iter()
            .filter(|f| f.kind.resource() == Resource::Instance)
            .filter(|f| overlaps(f))
            .count();
        if down + 1 > MAX_INSTANCES_DOWN {
            return false;
        }
    }
    true
}

/// The schedule as the run prints it.
pub fn describe(faults: &[Fault], instance_names: &[String], client_names: &[String]) -> String {
    let mut out = String::from("  #    at (s)  fault               target   dur (s)\n");
    for f in faults {
        let target = match f.kind.resource() {
            Resource::Instance => instance_names[f.target].clone(),
            Resource::Redis => "redis".to_owned(),
            Resource::Flag => "unleash".to_owned(),
            Resource::Client => client_names[f.target].clone(),
        };
        let _ = writeln!(
            out,
            "  {:<4} {:>6.1}  {:<19} {:<8} {:>6.1}",
            f.index,
            f.at as f64 / 1000.0,
            f.kind.name(),
            target,
            f.dur as f64 / 1000.0
        );
    }
    out
}

#[test]
fn a_seed_replays_the_same_schedule_and_no_target_has_two_faults_at_once() {
    use rand::SeedableRng;
    let a = schedule(&mut StdRng::seed_from_u64(7), 120, 3, 12, &KINDS);
    let b = schedule(&mut StdRng::seed_from_u64(7), 120, 3, 12, &KINDS);
    let show = |v: &[Fault]| format!("{v:?}");
    assert_eq!(show(&a), show(&b));
    for k in KINDS {
        assert!(a.iter().any(|f| f.kind == k), "{k:?} never planned");
    }
    for (i, x) in a.iter().enumerate() {
        for y in &a[i + 1..] {
            if x.kind.resource() == y.kind.resource()
                && (x.kind.resource().single() || x.target == y.target)
            {
                assert!(
                    x.busy_until() <= y.at || y.busy_until() <= x.at,
                    "{x:?} overlaps {y:?}"
                );
            }
        }
    }
}
