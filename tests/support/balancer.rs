//! Test support: runs a real load balancer (HAProxy, nginx or Caddy) with a
//! config file shipped in `lb-config/`, unchanged, in front of `sse-scale`
//! instances, the way `lb-config/README.md` tells operators to run it.
//!
//! Every balancer gets a free port, its own scratch directory (rendered
//! config, logs, runtime socket) and is stopped when dropped.

#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The variables the nginx templates may use; everything else (`$host`,
/// `$cookie_...`) must reach nginx untouched.
const NGINX_VARS: &str = "${LB_LISTEN} ${APP_1} ${APP_2} ${APP_3}";

/// A file under `lb-config/`, or under `$LB_CONFIG_DIR` when set (to try
/// a modified copy, e.g. to check that a test fails without a setting).
pub fn lb_config(rel: &str) -> PathBuf {
    match std::env::var_os("LB_CONFIG_DIR") {
        Some(dir) => PathBuf::from(dir).join(rel),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../lb-config")
            .join(rel),
    }
}

/// A port that was free a moment ago. The balancer binds it right after;
/// tests run in parallel, so a collision is possible but unlikely.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

/// Finds an installed binary. Looks in the sbin directories too: HAProxy
/// and nginx live in /usr/sbin, which is not on every user's PATH.
pub fn require_binary(name: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    let dirs = path
        .split(':')
        .map(PathBuf::from)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from));
    for dir in dirs {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "`{name}` is not installed; the load-balancer tests run the real balancer. \
         Install it (tests/run-all.sh installs haproxy, nginx, caddy and gettext-base \
         on Debian) and run the tests again."
    )
}

/// A fresh scratch directory, world-traversable so nginx workers running as
/// `nobody` (nginx started as root) can use the temp paths inside it.
fn scratch_dir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "sse-lb-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Haproxy,
    Nginx,
    Caddy,
}

/// A running balancer process.
pub struct Balancer {
    pub kind: Kind,
    child: Child,
    /// `127.0.0.1:<port>` the balancer listens on.
    pub addr: String,
    /// Scratch directory: rendered config, logs, HAProxy's runtime socket.
    pub dir: PathBuf,
}

impl Balancer {
    /// `haproxy -db -f lb-config/<file>` with the backends in APP_1..APP_3.
    pub async fn haproxy(file: &str, apps: &[&str; 3], env: &[(&str, &str)]) -> Balancer {
        let bin = require_binary("haproxy");
        let dir = scratch_dir("haproxy");
        let addr = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(bin);
        cmd.arg("-db").arg("-f").arg(lb_config(file));
        base_env(&mut cmd, &addr, apps, &dir);
        cmd.env("HAPROXY_SOCKET", dir.join("admin.sock"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        Balancer::spawn(Kind::Haproxy, cmd, addr, dir).await
    }

    /// Renders `lb-config/<template>` with envsubst (restricted to the LB
    /// variables) and runs `nginx -c <rendered> -p <scratch> -g 'daemon off;'`.
    pub async fn nginx(template: &str, apps: &[&str; 3]) -> Balancer {
        let nginx = require_binary("nginx");
        let envsubst = require_binary("envsubst");
        let dir = scratch_dir("nginx");
        let addr = format!("127.0.0.1:{}", free_port());
        let rendered = dir.join("nginx.conf");
        let mut render = Command::new(envsubst);
        render
            .arg(NGINX_VARS)
            .stdin(File::open(lb_config(template)).expect("open nginx template"))
            .stdout(File::create(&rendered).expect("create rendered config"));
        base_env(&mut render, &addr, apps, &dir);
        let status = render.status().expect("run envsubst");
        assert!(status.success(), "envsubst failed: {status}");
        let text = std::fs::read_to_string(&rendered).expect("read rendered config");
        assert!(
            text.contains("$proxy_add_x_forwarded_for"),
            "envsubst replaced nginx's own variables:\n{text}"
        );
        let mut cmd = Command::new(nginx);
        cmd.arg("-c")
            .arg(&rendered)
            .arg("-p")
            .arg(&dir)
            .arg("-g")
            .arg("daemon off;");
        base_env(&mut cmd, &addr, apps, &dir);
        Balancer::spawn(Kind::Nginx, cmd, addr, dir).await
    }

    /// `caddy run --config lb-config/<file> --adapter caddyfile`.
    pub async fn caddy(file: &str, apps: &[&str; 3], env: &[(&str, &str)]) -> Balancer {
        let bin = require_binary("caddy");
        let dir = scratch_dir("caddy");
        let addr = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .arg("--config")
            .arg(lb_config(file))
            .arg("--adapter")
            .arg("caddyfile");
        base_env(&mut cmd, &addr, apps, &dir);
        // Caddy keeps state (autosaved config, certificates) under these.
        cmd.env("HOME", &dir)
            .env("XDG_CONFIG_HOME", dir.join("config"))
            .env("XDG_DATA_HOME", dir.join("data"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        Balancer::spawn(Kind::Caddy, cmd, addr, dir).await
    }

    async fn spawn(kind: Kind, mut cmd: Command, addr: String, dir: PathBuf) -> Balancer {
        let log = File::create(dir.join("balancer.log")).expect("create log");
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log);
        let child = cmd.spawn().expect("spawn balancer");
        let mut balancer = Balancer {
            kind,
            child,
            addr,
            dir,
        };
        balancer.wait_ready().await;
        balancer
    }

    /// Waits until a request through the balancer reaches an instance.
    async fn wait_ready(&mut self) {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("client");
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{:?} exited with {status} before answering; log:\n{}",
                    self.kind,
                    self.log()
                );
            }
            if let Ok(res) = client.get(self.url("/readyz")).send().await {
                if res.status() == 200 && res.headers().contains_key("x-instance-id") {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "{:?} did not answer on {} within 15 s; log:\n{}",
            self.kind,
            self.addr,
            self.log()
        );
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The balancer's process id (nginx: its master's).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the balancer logged so far (for failure messages).
    pub fn log(&self) -> String {
        let mut out = String::new();
        for name in ["balancer.log", "error.log"] {
            if let Ok(text) = std::fs::read_to_string(self.dir.join(name)) {
                out.push_str(&format!("--- {name}\n{text}"));
            }
        }
        out
    }

    /// Edits the rendered nginx config with `edit` and reloads nginx
    /// (`nginx -s reload`), as an operator does to drain an instance. Old
    /// workers keep serving the connections they hold; new ones use the
    /// edited config.
    pub fn nginx_reload(&self, edit: impl FnOnce(&str) -> String) {
        assert_eq!(self.kind, Kind::Nginx, "reload by signal is nginx's");
        let conf = self.dir.join("nginx.conf");
        let before = std::fs::read_to_string(&conf).expect("read rendered config");
        let after = edit(&before);
        assert_ne!(before, after, "the edit changed nothing");
        std::fs::write(&conf, after).expect("write config");
        let out = Command::new(require_binary("nginx"))
            .arg("-s")
            .arg("reload")
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(&self.dir)
            .output()
            .expect("run nginx -s reload");
        assert!(
            out.status.success(),
            "nginx -s reload failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Sends one command to HAProxy's runtime API (the `stats socket`) and
    /// returns its answer, as `socat stdio unix-connect:$HAPROXY_SOCKET` would.
    pub fn haproxy_command(&self, command: &str) -> String {
        assert_eq!(self.kind, Kind::Haproxy, "runtime API is HAProxy's");
        let mut sock = UnixStream::connect(self.dir.join("admin.sock")).expect("connect socket");
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        sock.write_all(format!("{command}\n").as_bytes())
            .expect("write command");
        // Without `prompt` HAProxy answers one command and closes.
        let mut answer = String::new();
        sock.read_to_string(&mut answer).expect("read answer");
        answer
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        // nginx: TERM makes the master stop its workers (a killed master
        // would leave them running). HAProxy and Caddy are single processes.
        if self.kind == Kind::Nginx {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The variables every shipped config reads; nothing else leaks in from
/// the test's own environment.
fn base_env(cmd: &mut Command, listen: &str, apps: &[&str; 3], dir: &Path) {
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("TMPDIR", dir)
        .env("LB_LISTEN", listen)
        .env("APP_1", apps[0])
        .env("APP_2", apps[1])
        .env("APP_3", apps[2]);
}

/// Polls `f` until it holds or `within` passes.
pub fn eventually_sync(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}
