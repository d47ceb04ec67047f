//! A real `redis-server` per test, on a free port, that a test can stop and
//! start again on the same port.

#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    /// With [`RedisServer::start_persistent`]: where its append-only file
    /// lives, so a restart finds the data again.
    data_dir: Option<std::path::PathBuf>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let port = free_port();
        let mut server = RedisServer {
            port,
            child: None,
            data_dir: None,
        };
        server.restart();
        server
    }

    /// As [`RedisServer::start`], but with an append-only file in a
    /// directory of its own (`--appendonly yes --dir <tmp>`): a restart after
    /// [`RedisServer::shutdown`] keeps the data; [`RedisServer::wipe`] before
    /// a restart loses it.
    pub fn start_persistent() -> RedisServer {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("sse-redis-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the Redis data directory");
        let mut server = RedisServer {
            port,
            child: None,
            data_dir: Some(dir),
        };
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The running server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("not running").id()
    }

    /// (Re)starts the server on its port and waits until it answers.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ]);
        match &self.data_dir {
            Some(dir) => cmd.args(["--appendonly", "yes", "--dir"]).arg(dir),
            None => cmd.args(["--appendonly", "no"]),
        };
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (tests/run-all.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(mut c) = redis::Client::open(self.url()).and_then(|c| c.get_connection()) {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not start", self.port);
    }

    /// Kills the server (SIGKILL: an outage, not a shutdown).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server with SIGTERM, as an operator's restart does: with
    /// an append-only file, every write is on disk when it has exited.
    pub fn shutdown(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
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

    /// Deletes the stopped server's data files: the next restart is empty.
    pub fn wipe(&self) {
        assert!(self.child.is_none(), "wipe a stopped server");
        if let Some(dir) = &self.data_dir {
            let _ = std::fs::remove_dir_all(dir);
            std::fs::create_dir_all(dir).expect("create the Redis data directory");
        }
    }

    /// A session's history stream (`XRANGE` of its key), oldest first: each
    /// entry's id and its fields, names and values alternating.
    pub fn history(&self, session: &str) -> Vec<(String, Vec<String>)> {
        redis::cmd("XRANGE")
            .arg(format!("sse:session:{session}:history"))
            .arg("-")
            .arg("+")
            .query(&mut self.conn())
            .unwrap()
    }

    /// Freezes the server (SIGSTOP): its connections stay open and nothing
    /// is answered, as with a hung host. [`RedisServer::resume`] undoes it.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, sig: &str) {
        let child = self.child.as_ref().expect("not running");
        let ok = Command::new("kill")
            .args([format!("-{sig}"), child.id().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        if let Some(dir) = &self.data_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
