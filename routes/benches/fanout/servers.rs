//! The servers the fan-out bench compares — the release `sse-scale` binary
//! and the two baselines of `routes/benches/support/baselines.rs` — and how
//! each is started, so all of them run with the same settings.

use std::process::Command;

use crate::support::server::{roomy_client_queue, warnings_to_stderr, BenchServer as Server};

/// Which server a process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The bench's minimal server (../support/baselines.rs): the floor.
    Floor,
    /// axum `Sse` over `tokio::sync::broadcast` (../support/baselines.rs).
    Axum,
    /// The release `sse-scale` binary.
    Product,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Floor => "floor",
            Kind::Axum => "axum",
            Kind::Product => "sse-scale",
        }
    }

    /// The server a name of `BENCH_SERVERS` or of the results stands for.
    pub fn named(name: &str) -> Option<Kind> {
        match name {
            "floor" => Some(Kind::Floor),
            "axum" => Some(Kind::Axum),
            "sse-scale" => Some(Kind::Product),
            _ => None,
        }
    }
}

/// Starts `kind` as instance `name` with `extra` settings.
pub fn start_server(kind: Kind, name: &str, extra: &[(&str, String)]) -> Server {
    // `BENCH_SERVER_WRAP="perf record -g -o /tmp/p.data --"` runs the
    // servers under a profiler (the CPU figures are then the wrapper's).
    let wrap = std::env::var("BENCH_SERVER_WRAP").unwrap_or_default();
    start_server_wrapped(kind, name, extra, &wrap)
}

/// Starts `kind` under `wrap` (a command line the server's own command is
/// appended to; empty for none).
pub fn start_server_wrapped(
    kind: Kind,
    name: &str,
    extra: &[(&str, String)],
    wrap: &str,
) -> Server {
    let product = env!("CARGO_BIN_EXE_sse-scale");
    let me = std::env::current_exe().expect("the bench binary's path");
    // A baseline is this bench binary itself, re-executed in a mode.
    let (bin, args): (&std::ffi::OsStr, &[&str]) = match kind {
        Kind::Product => (product.as_ref(), &[]),
        Kind::Floor => (me.as_os_str(), &["--baseline", "floor"]),
        Kind::Axum => (me.as_os_str(), &["--baseline", "axum"]),
    };
    let mut words = wrap.split_whitespace();
    let mut cmd = match words.next() {
        Some(prog) => {
            let mut c = Command::new(prog);
            c.args(words).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    cmd.args(args);
    let mut env = vec![("MAX_STREAMS", "19000".to_owned()), roomy_client_queue()];
    env.extend(extra.iter().cloned());
    Server::start(cmd, name, &env, warnings_to_stderr("server"))
}
