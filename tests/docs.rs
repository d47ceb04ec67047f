//! The operator's documents, walked. Every shell block of
//! `docs/migration.md`, `lb-config/README.md` and `docs/flags.md` is marked
//! ```` ```sh walk:NAME ```` and run exactly as written by
//! `tests/docs/walk.sh`, in a private network namespace that holds the
//! documents' example fleet (real instances, HAProxy, nginx, Caddy, Redis
//! and a real Unleash), which checks after each step that it did what the
//! text says. A block that fails as written fails its walk; a shell block
//! without a walk fails `every_shell_block_of_the_runbooks_is_walked`.

#[path = "support/redis_server.rs"]
mod redis_server;
#[allow(dead_code)]
#[path = "support/unleash.rs"]
mod unleash;

use std::path::PathBuf;
use std::process::Command;

use unleash::Unleash;

/// The documents an operator follows, whose commands must run as written.
const RUNBOOKS: [&str; 3] = ["docs/migration.md", "lb-config/README.md", "docs/flags.md"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs one scenario of the walk; panics with its output unless it passed.
/// Returns the blocks it ran.
fn walk(scenario: &str, env: &[(&str, String)]) -> Vec<String> {
    let out = Command::new("bash")
        .arg(repo().join("tests/docs/walk.sh"))
        .arg(scenario)
        .env("SSE_SCALE_BIN", env!("CARGO_BIN_EXE_sse-scale"))
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("run tests/docs/walk.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "walk {scenario} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let walked = stdout
        .lines()
        .find_map(|l| l.strip_prefix("walked: "))
        .unwrap_or_else(|| panic!("walk {scenario} did not say what it ran:\n{stdout}"));
    walked.split_whitespace().map(str::to_owned).collect()
}

/// The `walk:` names of the shell blocks in one document, in order; panics
/// on a shell block without one.
fn walk_blocks(doc: &str) -> Vec<String> {
    let text = std::fs::read_to_string(repo().join(doc)).expect("read the document");
    let mut names = Vec::new();
    let mut in_fence = false;
    for (n, line) in text.lines().enumerate() {
        let Some(info) = line.strip_prefix("```") else {
            continue;
        };
        if in_fence {
            in_fence = false;
            continue;
        }
        in_fence = true;
        let mut words = info.split_whitespace();
        let lang = words.next().unwrap_or("");
        if matches!(lang, "sh" | "bash" | "shell" | "console") {
            let name = words
                .next()
                .and_then(|w| w.strip_prefix("walk:"))
                .unwrap_or_else(|| {
                    panic!("{doc}:{}: a shell block without `walk:NAME`: {line}", n + 1)
                });
            names.push(name.to_owned());
        }
    }
    names
}

#[test]
fn every_shell_block_of_the_runbooks_is_walked() {
    let script = std::fs::read_to_string(repo().join("tests/docs/walk.sh")).expect("walk.sh");
    let mut all = Vec::new();
    for doc in RUNBOOKS {
        for name in walk_blocks(doc) {
            assert!(
                script.contains(&format!(" {name}\n")) || script.contains(&format!(" {name} ")),
                "{doc}: block walk:{name} is run by no scenario of tests/docs/walk.sh"
            );
            assert!(!all.contains(&name), "walk:{name} appears twice");
            all.push(name);
        }
    }
    // The runbooks do hold commands; an empty list would mean the markers
    // were lost, not that everything is walked.
    assert!(
        all.len() >= 15,
        "only {} walked blocks found: {all:?}",
        all.len()
    );
}

#[test]
fn haproxy_run_and_drain_commands_work_as_written() {
    let ran = walk("haproxy", &[]);
    assert_eq!(
        ran,
        [
            "haproxy-check",
            "haproxy-start",
            "haproxy-drain",
            "haproxy-ready"
        ]
    );
}

#[test]
fn nginx_run_and_drain_commands_work_as_written() {
    let ran = walk("nginx", &[]);
    assert_eq!(
        ran,
        ["nginx-check", "nginx-start", "nginx-drain", "nginx-ready"]
    );
}

#[test]
fn caddy_run_and_drain_commands_work_as_written() {
    let ran = walk("caddy", &[]);
    assert_eq!(
        ran,
        ["caddy-check", "caddy-start", "caddy-drain", "caddy-ready"]
    );
}

#[test]
fn install_and_rolling_restart_work_as_written() {
    let ran = walk("deploy", &[]);
    assert_eq!(ran, ["help", "rolling-restart"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn flag_rollout_and_rollback_work_as_written_against_unleash() {
    let unleash = Unleash::start().await;
    let ran = tokio::task::spawn_blocking(move || {
        let ran = walk(
            "flags",
            &[
                ("UNLEASH_PORT", unleash.port.to_string()),
                ("UNLEASH_ADMIN_TOKEN", unleash::ADMIN_TOKEN.to_owned()),
                (
                    "UNLEASH_CLIENT_TOKEN",
                    unleash::PRODUCTION_CLIENT_TOKEN.to_owned(),
                ),
            ],
        );
        drop(unleash);
        ran
    })
    .await
    .expect("the walk");
    assert_eq!(
        ran,
        [
            "flags-env",
            "flags-rollout",
            "flags-inspect",
            "flags-rollback"
        ]
    );
}

/// Every test a document names in brackets (`[`tests/x.rs`: `name`]`, or a
/// bare name in a document that says "(`tests/x.rs` unless noted)") is a
/// test function of the file it points at: a renamed or moved test must
/// take its reference along, or the claim it backs is unchecked.
#[test]
fn every_test_a_document_names_is_in_the_file_it_names() {
    let mut missing = Vec::new();
    let mut checked = 0;
    let docs = std::fs::read_dir(repo().join("docs")).expect("docs/");
    for doc in docs.map(|d| d.expect("entry").path()) {
        if doc.extension().is_none_or(|e| e != "md") {
            continue;
        }
        let text = std::fs::read_to_string(&doc).expect("read the document");
        let default = text
            .split("unless noted)")
            .next()
            .filter(|head| head.len() < text.len())
            .and_then(|head| head.rsplit("(`").next())
            .and_then(|tail| tail.strip_suffix("` "))
            .map(str::to_owned);
        for group in text.split('[').skip(1) {
            let Some((inside, _)) = group.split_once(']') else {
                continue;
            };
            let mut file = default.clone();
            for token in inside.split('`').skip(1).step_by(2) {
                if token.ends_with(".rs") {
                    file = Some(token.to_owned());
                    continue;
                }
                let is_name = token.contains('_')
                    && token
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
                if !is_name {
                    continue;
                }
                let name = doc.file_name().unwrap().to_string_lossy().into_owned();
                let Some(file) = &file else {
                    missing.push(format!("{name}: `{token}` names no file"));
                    continue;
                };
                let source = std::fs::read_to_string(repo().join(file)).unwrap_or_default();
                let defined = source
                    .match_indices(&format!("fn {token}"))
                    .any(|(at, m)| source[at + m.len()..].starts_with(['(', '<']));
                checked += 1;
                if !defined {
                    missing.push(format!("{name}: `{token}` is not a test of {file}"));
                }
            }
        }
    }
    assert!(
        checked > 20,
        "only {checked} references found: is the parser right?"
    );
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}
