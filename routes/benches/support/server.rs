//! The server processes a bench starts: the release `sse-scale` binary (or
//! a baseline: the bench binary itself, re-executed in a mode), with the
//! settings every bench needs, its log drained for the whole run, stopped
//! with SIGTERM when dropped. Shared by the bench targets; each adds only
//! what its scenario is about (Redis, queue length, retry hint).

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::procs::{proc_cpu, proc_cpu_split, proc_rss_kib, ADMIN, SECRET};

/// What a server prints that a bench wants to see: called with every log
/// line (from the log's own thread).
pub type OnLine = Box<dyn FnMut(&str) + Send>;

/// `SSE_CLIENT_QUEUE` of a bench that saturates the machine: room for a
/// reader that falls behind, so a slow load generator shows as latency,
/// not as streams cut for lagging.
pub fn roomy_client_queue() -> (&'static str, String) {
    ("SSE_CLIENT_QUEUE", "1024".to_owned())
}

/// Prints the WARN and ERROR lines of a server's log, as `[tag] line`.
pub fn warnings_to_stderr(tag: &str) -> OnLine {
    let tag = tag.to_owned();
    Box::new(move |line: &str| {
        if line.contains("WARN") || line.contains("ERROR") {
            eprintln!("[{tag}] {line}");
        }
    })
}

/// A running server process; SIGTERM (then SIGKILL after 10 s) when
/// dropped, so a profiler wrapping it writes its data.
pub struct BenchServer {
    child: Option<Child>,
    pid: u32,
    pub addr: SocketAddr,
}

impl BenchServer {
    /// The release `sse-scale` binary as instance `name`, with `extra`
    /// settings on top of the bench defaults; WARN and ERROR lines are
    /// printed.
    pub fn product(name: &str, extra: &[(&str, String)]) -> BenchServer {
        Self::start(
            Command::new(env!("CARGO_BIN_EXE_sse-scale")),
            name,
            extra,
            warnings_to_stderr(name),
        )
    }

    /// `cmd` (a program and its arguments) as instance `name`: the
    /// environment is cleared and set to the bench defaults plus `extra`;
    /// `on_line` sees every log line.
    pub fn start(
        mut cmd: Command,
        name: &str,
        extra: &[(&str, String)],
        mut on_line: OnLine,
    ) -> BenchServer {
        cmd.env_clear()
            .env("HOST", "127.0.0.1")
            .env("PORT", "0")
            .env("INSTANCE_ID", name)
            .env("SESSION_SECRET", SECRET)
            .env("ADMIN_TOKEN", ADMIN)
            // The load generator is one address (or the balancers' address):
            // per-address and per-session limits would throttle the bench,
            // not the crowd of clients it stands for.
            .env("RATE_LIMIT_PUBLISH_PER_SEC", "0")
            .env("RATE_LIMIT_STREAMS_PER_MIN", "0")
            .env("RATE_LIMIT_SESSIONS_PER_MIN", "0")
            .env("MAX_STREAMS_PER_ADDRESS", "10000000")
            .env("MAX_CONNECTIONS_PER_ADDRESS", "10000000")
            // Its share of the replay budget is the instance's.
            .env("REPLAY_BUDGET_PER_ADDRESS_MB", "64")
            // End quickly when the bench is done with a server.
            .env("SHUTDOWN_UNREADY_SECS", "0")
            .env("SHUTDOWN_DRAIN_SECS", "0")
            .env("SHUTDOWN_GRACE_SECS", "2")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn the server");
        let stderr = child.stderr.take().expect("server stderr");
        let (tx, rx) = mpsc::channel();
        // Drains the log for the whole run so the server never blocks on it.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("addr=").nth(1) {
                    if let Some(tx) = tx.take() {
                        let addr = addr.split_whitespace().next().unwrap_or("").to_owned();
                        let _ = tx.send(addr);
                    }
                }
                on_line(&line);
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("server did not log its address")
            .parse()
            .expect("server address");
        BenchServer {
            pid: child.id(),
            child: Some(child),
            addr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn cpu(&self) -> Duration {
        proc_cpu(self.pid)
    }

    pub fn cpu_split(&self) -> (Duration, Duration) {
        proc_cpu_split(self.pid)
    }

    pub fn rss_kib(&self) -> u64 {
        proc_rss_kib(self.pid)
    }

    /// SIGKILL, as a crashed or evicted instance.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for BenchServer {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: kill has no memory preconditions; the pid is our child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}
