//! Bench support: what the processes a benchmark starts cost — their CPU
//! time and memory from `/proc` — the machine a run was on, and the bench's
//! own open-file limit. (The processes themselves: `server.rs`, and
//! `tests/support` for Redis and the balancers.) Shared by the bench
//! targets, each of which uses part of it.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

/// `SESSION_SECRET` of every server a bench starts.
pub const SECRET: &str = "bench-secret-of-at-least-32-bytes-0123456789";
/// `ADMIN_TOKEN` of every server a bench starts (for `/stats`).
pub const ADMIN: &str = "bench-admin-token-0123456789";

/// Raises this process's open-file soft limit to the hard limit and
/// returns it: both ends of every stream live on this machine, so the load
/// generator needs one socket per stream too.
pub fn raise_nofile() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).expect("raise the open-file limit")
}

/// User and system CPU time of a process (all threads), from `/proc/<pid>/stat`.
pub fn proc_cpu_split(pid: u32) -> (Duration, Duration) {
    try_proc_cpu_split(pid).expect("read utime and stime from /proc/pid/stat")
}

/// [`proc_cpu_split`], or `None` once the process is gone.
pub fn try_proc_cpu_split(pid: u32) -> Option<(Duration, Duration)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces; fields are counted after its ')'.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the full line (11, 12 here).
    let user: u64 = fields.get(11)?.parse().ok()?;
    let sys: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let time = |ticks: u64| Duration::from_nanos(ticks * 1_000_000_000 / hz);
    Some((time(user), time(sys)))
}

/// Nanoseconds on a CPU of each of a process's threads (the scheduler's
/// own count, `/proc/<pid>/task/<tid>/schedstat`), by thread id: `stat`'s
/// clock ticks are 10 ms, which in a 2 s window is 5 % of the figure.
pub fn proc_thread_ns(pid: u32) -> Option<Vec<(u32, u64)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let entry = entry.ok()?;
        let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        // A thread may end between the listing and the read.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("schedstat")) else {
            continue;
        };
        out.push((tid, stat.split_whitespace().next()?.parse().ok()?));
    }
    Some(out)
}

/// The CPU time between two [`proc_thread_ns`] readings, if no thread of
/// the first ended before the second (its time would be missing).
pub fn thread_ns_between(before: &[(u32, u64)], after: &[(u32, u64)]) -> Option<Duration> {
    let mut total = 0u64;
    for (tid, ns) in after {
        let was = before.iter().find(|(t, _)| t == tid).map_or(0, |(_, n)| *n);
        total += ns.checked_sub(was)?;
    }
    let kept = before
        .iter()
        .all(|(tid, _)| after.iter().any(|(t, _)| t == tid));
    kept.then(|| Duration::from_nanos(total))
}

/// User + system CPU time of a process (all threads).
pub fn proc_cpu(pid: u32) -> Duration {
    let (user, sys) = proc_cpu_split(pid);
    user + sys
}

/// [`proc_cpu`], or `None` once the process is gone.
pub fn try_proc_cpu(pid: u32) -> Option<Duration> {
    try_proc_cpu_split(pid).map(|(user, sys)| user + sys)
}

/// Resident set size in KiB, from `/proc/<pid>/status`.
pub fn proc_rss_kib(pid: u32) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/pid/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/pid/status")
}

/// (busy, total) jiffies of the whole machine, from `/proc/stat`: how
/// saturated the cores were, whoever used them.
pub fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    // idle + iowait are not busy.
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// The machine a bench ran on (for the results file).
pub fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": model,
        "mem_gib": mem_kib as f64 / 1024.0 / 1024.0,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
    })
}

/// The first line `program arg` prints (`redis-server --version`,
/// `haproxy -v`), for the results file; empty if it does not run.
pub fn version_of(program: impl AsRef<OsStr>, arg: &str) -> String {
    Command::new(program)
        .arg(arg)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

/// Today's UTC date, `YYYY-MM-DD` (days-to-civil, proleptic Gregorian).
pub fn today() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let z = secs.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}
