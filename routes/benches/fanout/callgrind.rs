//! Callgrind: user-space instructions per delivery and per stream open of
//! each server under `valgrind --tool=callgrind`, a figure that does not
//! move with the noise of the shared machine the CPU times suffer from.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::servers::{start_server_wrapped, Kind};
use crate::support::server::BenchServer as Server;
use crate::support::sse_client::{create_sessions, publish_all};
use crate::support::streams::{open_streams, Collector, Via};
use crate::FANOUT;

/// User-space instructions per delivery (and per stream open) under
/// `valgrind --tool=callgrind`: a stable figure beside the noisy CPU times.
/// The counters are zeroed when publishing starts and dumped when the last
/// delivery has arrived (`callgrind_control`), so set-up is not counted.
pub async fn callgrind(
    kind: Kind,
    streams: usize,
    rate: f64,
    secs: f64,
    env: &[(&str, String)],
) -> Value {
    let dir = std::env::temp_dir().join(format!(
        "sse-bench-cg-{}-{}",
        kind.name(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("callgrind dir");
    let out = dir.join("cg.out");
    let server = start_server_wrapped(
        kind,
        "bench-cg",
        env,
        &format!(
            "valgrind --tool=callgrind --callgrind-out-file={}",
            out.display()
        ),
    );
    let http = reqwest::Client::new();
    let n_sessions = streams.div_ceil(FANOUT);
    let sessions = create_sessions(&http, server.addr, n_sessions).await;
    let col = Collector::new();
    let zero = || {
        Command::new("callgrind_control")
            .env("HOST", "127.0.0.1")
            .env_remove("USER")
            .arg("-z")
            .arg(server.pid().to_string())
            .output()
            .expect("callgrind_control")
    };
    zero();
    let _logs = open_streams(server.addr, Via::Fresh, &sessions, FANOUT, &col).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let opens_ir = dump_ir(&server, &dir, "opens");
    let route = vec![server.addr; n_sessions];
    let publishes = rate / FANOUT as f64;
    let per_session = ((publishes * secs) / n_sessions as f64).ceil().max(1.0) as u64;
    zero();
    let failed = publish_all(&http, &sessions, &route, publishes, 0..per_session).await;
    assert_eq!(failed, 0, "publishes failed");
    let published = per_session * n_sessions as u64;
    let expected = published * FANOUT as u64;
    col.wait_delivered(expected, Duration::from_secs(60), Duration::from_millis(10))
        .await;
    let ir = dump_ir(&server, &dir, "deliveries");
    let delivered = col.delivered.load(Ordering::Relaxed);
    let opened = col.connected.load(Ordering::Relaxed) as u64;
    let per_delivery = ir as f64 / delivered.max(1) as f64;
    let per_open = opens_ir as f64 / opened.max(1) as f64;
    eprintln!(
        "  callgrind {:9}: {delivered}/{expected} deliveries, {per_delivery:.0} instructions/delivery (publish included); {opened} opens, {per_open:.0} instructions/open",
        kind.name()
    );
    drop(server);
    if std::env::var_os("BENCH_CG_KEEP").is_some() {
        // For `callgrind_annotate`: the dumps `opens` and `deliveries`.
        eprintln!(
            "  callgrind {:9}: dumps kept in {}",
            kind.name(),
            dir.display()
        );
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    json!({
        "server": kind.name(), "streams": streams, "deliveries": delivered, "expected": expected,
        "instructions": ir, "instructions_per_delivery": per_delivery,
        "opens": opened, "open_instructions": opens_ir, "instructions_per_open": per_open,
    })
}

/// Dumps the callgrind counters of `server` and returns the instructions
/// counted since they were last zeroed.
fn dump_ir(server: &Server, dir: &Path, label: &str) -> u64 {
    let before: Vec<_> = std::fs::read_dir(dir)
        .expect("callgrind dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    let ctl = Command::new("callgrind_control")
        .args(["-d", label, &server.pid().to_string()])
        // vgdb finds the server by `$USER` and `$HOST` in its pipe names,
        // and the server runs with `HOST=127.0.0.1`.
        .env("HOST", "127.0.0.1")
        .env_remove("USER")
        .output()
        .expect("callgrind_control");
    assert!(
        String::from_utf8_lossy(&ctl.stdout).contains("OK"),
        "callgrind_control -d: {} {}",
        String::from_utf8_lossy(&ctl.stdout),
        String::from_utf8_lossy(&ctl.stderr)
    );
    // The dump is a new file `cg.out.<n>`; its `summary:` line is the total.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for e in std::fs::read_dir(dir).expect("callgrind dir").flatten() {
            let p = e.path();
            if before.contains(&p) {
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            if let Some(total) = text.lines().find_map(|l| {
                l.strip_prefix("summary:")
                    .or_else(|| l.strip_prefix("totals:"))
            }) {
                return total
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
            }
        }
        assert!(
            Instant::now() < deadline,
            "no callgrind dump in {}: {:?}",
            dir.display(),
            std::fs::read_dir(dir).map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
