//! A real Unleash server per test: the npm package `unleash-server`,
//! installed once outside the repository by `tests/unleash/setup.sh`, run by
//! Node on a free port with its own PostgreSQL database, with known admin and
//! backend API tokens. Killed (and its database dropped) when dropped.
//!
//! PostgreSQL must accept `postgres://postgres@127.0.0.1:5432` without a
//! password (`tests/run-all.sh` sets that up on a fresh machine), or
//! `SSE_SCALE_PG_URL` names another server.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::redis_server::free_port;

/// Admin API token the server is started with (`INIT_ADMIN_API_TOKENS`).
pub const ADMIN_TOKEN: &str = "*:*.sse-scale-test-admin";
/// Backend token for the `development` environment the servers read.
pub const CLIENT_TOKEN: &str = "default:development.sse-scale-test-client";
pub const ENVIRONMENT: &str = "development";
/// Backend token for the `production` environment, the one the operators'
/// documents use (`tests/docs.rs`).
pub const PRODUCTION_CLIENT_TOKEN: &str = "default:production.sse-scale-test-client";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs the install script once per test binary; the directory holding
/// `node_modules/unleash-server` and the `node` to run it with.
fn install() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = Command::new("bash")
            .arg(repo().join("tests/unleash/setup.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("run tests/unleash/setup.sh");
        assert!(out.status.success(), "tests/unleash/setup.sh failed");
        let stdout = String::from_utf8_lossy(&out.stdout);
        PathBuf::from(
            stdout
                .lines()
                .last()
                .expect("setup.sh prints the directory")
                .trim(),
        )
    })
}

fn pg_url() -> String {
    std::env::var("SSE_SCALE_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

fn psql(sql: &str) {
    let out = Command::new("psql")
        .args([&format!("{}/postgres", pg_url()), "-qXc", sql])
        .output()
        .expect("psql must be installed (tests/run-all.sh installs PostgreSQL)");
    assert!(
        out.status.success(),
        "psql {sql:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub struct Unleash {
    pub port: u16,
    database: String,
    log: PathBuf,
    child: Option<Child>,
}

impl Unleash {
    /// Starts a server on a fresh database and waits until it is healthy.
    /// A port another process took between choosing it and listening on it
    /// (the machine is shared) costs a retry on another port, not the test.
    pub async fn start() -> Unleash {
        let mut failed = String::new();
        for _ in 0..3 {
            match Self::try_start().await {
                Ok(server) => return server,
                Err(log) if log.contains("EADDRINUSE") => failed = log,
                Err(log) => panic!("Unleash did not become healthy:\n{log}"),
            }
        }
        panic!("Unleash found no free port in three tries:\n{failed}");
    }

    async fn try_start() -> Result<Unleash, String> {
        let dir = install();
        let port = free_port();
        let database = format!("sse_scale_unleash_{port}");
        psql(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"));
        psql(&format!("CREATE DATABASE {database}"));
        let log = std::env::temp_dir().join(format!("sse-scale-unleash-{port}.log"));
        let log_file = std::fs::File::create(&log).expect("create the Unleash log");
        let child = Command::new(dir.join("node"))
            .arg(repo().join("tests/unleash/server.js"))
            .env("NODE_PATH", dir.join("node_modules"))
            .env("DATABASE_URL", format!("{}/{database}", pg_url()))
            .env("DATABASE_SSL", "false")
            .env("HTTP_PORT", port.to_string())
            .env("LOG_LEVEL", "warn")
            .env("INIT_ADMIN_API_TOKENS", ADMIN_TOKEN)
            .env(
                "INIT_BACKEND_API_TOKENS",
                format!("{CLIENT_TOKEN},{PRODUCTION_CLIENT_TOKEN}"),
            )
            .stdout(log_file.try_clone().expect("log file"))
            .stderr(log_file)
            .spawn()
            .expect("run unleash-server with the Node that setup.sh chose");
        let mut server = Unleash {
            port,
            database,
            log,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(90);
        let health = format!("http://127.0.0.1:{port}/health");
        while Instant::now() < deadline {
            if let Ok(r) = reqwest::get(&health).await {
                if r.status().is_success() {
                    return Ok(server);
                }
            }
            let exited = server.child.as_mut().map(|c| c.try_wait());
            if let Some(Ok(Some(_))) = exited {
                return Err(server.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(server.log())
    }

    /// What the server logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `UNLEASH_URL` for the servers under test.
    pub fn api_url(&self) -> String {
        format!("http://127.0.0.1:{}/api", self.port)
    }

    /// Runs `flags/unleash-flags.sh` (the operators' script) against this
    /// server; panics if it fails.
    pub async fn flags(&self, args: &[&str]) -> String {
        let out = self.flags_output(args).await;
        assert!(
            out.status.success(),
            "unleash-flags.sh {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs the script and returns what it did, success or not.
    pub async fn flags_output(&self, args: &[&str]) -> std::process::Output {
        tokio::process::Command::new("bash")
            .arg(repo().join("flags/unleash-flags.sh"))
            .args(args)
            .env(
                "UNLEASH_ADMIN_URL",
                format!("http://127.0.0.1:{}", self.port),
            )
            .env("UNLEASH_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("UNLEASH_ENVIRONMENT", ENVIRONMENT)
            .output()
            .await
            .expect("run flags/unleash-flags.sh")
    }

    /// Kills the server (an outage: clients keep polling a closed port).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Unleash {
    fn drop(&mut self) {
        self.stop();
        let _ = Command::new("psql")
            .args([
                &format!("{}/postgres", pg_url()),
                "-qXc",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.database),
            ])
            .output();
        let _ = std::fs::remove_file(&self.log);
    }
}
