//! The storm's `sse-scale` instances: app1 (killed) and the survivors
//! app2 and app3, each counting the warnings of its log the storm reports.

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::support::redis_server::RedisServer;
use crate::support::server::BenchServer;

/// An instance, and the warnings it logged that the storm reports.
pub struct App {
    pub server: BenchServer,
    /// `subscribing the session's channel is late` warnings logged: a
    /// stream that waited the whole bound (2 × the Redis response timeout)
    /// for its session's channel to be confirmed.
    pub late_subscribes: Arc<AtomicU64>,
    /// `history unreadable: the resume gets a reset` warnings: a resume
    /// that found Redis unreachable.
    pub history_unreadable: Arc<AtomicU64>,
    /// Other WARN/ERROR lines.
    pub warnings: Arc<AtomicU64>,
}

impl App {
    pub fn start(name: &'static str, redis: &RedisServer, retry_ms: Option<u64>) -> App {
        let mut env = vec![
            ("REDIS_URL", redis.url()),
            ("FF_REDIS_SSE_BROADCAST", "true".to_owned()),
        ];
        if let Some(ms) = retry_ms {
            env.push(("SSE_RETRY_MS", ms.to_string()));
        }
        let late_subscribes = Arc::new(AtomicU64::new(0));
        let warnings = Arc::new(AtomicU64::new(0));
        let history_unreadable = Arc::new(AtomicU64::new(0));
        let (late, unreadable, warned) = (
            late_subscribes.clone(),
            history_unreadable.clone(),
            warnings.clone(),
        );
        // Counts the warnings, prints the first few of each kind.
        let server = BenchServer::start(
            Command::new(env!("CARGO_BIN_EXE_sse-scale")),
            name,
            &env,
            Box::new(move |line: &str| {
                if line.contains("subscribing the session's channel is late") {
                    if late.fetch_add(1, Ordering::Relaxed) < 2 {
                        eprintln!("[{name}] {line}");
                    }
                } else if line.contains("history unreadable") {
                    if unreadable.fetch_add(1, Ordering::Relaxed) < 2 {
                        eprintln!("[{name}] {line}");
                    }
                } else if (line.contains("WARN") || line.contains("ERROR"))
                    && warned.fetch_add(1, Ordering::Relaxed) < 5
                {
                    eprintln!("[{name}] {line}");
                }
            }),
        );
        App {
            server,
            late_subscribes,
            history_unreadable,
            warnings,
        }
    }

    /// SIGKILL, as a crashed or evicted instance.
    pub fn kill(&mut self) {
        self.server.kill();
    }
}
