//! The browser client module (`src/js/sse-scale.js`) under Node's own test
//! runner: `node --test tests/js/`, the unit tests of its stream logic
//! (held events, overflow, close()/open() during a resync, parser errors,
//! the backoff of both transports, the liveness deadline) with fake timers
//! and a faked network. No browser and no server: the Chromium scenarios
//! in `tests/browser.rs` cover the module against real processes.
//!
//! Needs `node` 20 or later (tests/run-all.sh installs nodejs).

use std::path::Path;
use std::process::Command;

#[test]
fn the_client_module_s_stream_logic_passes_its_node_unit_tests() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let output = match Command::new("node")
        .args(["--test", "--test-reporter=tap", "tests/js/"])
        .current_dir(&repo)
        .output()
    {
        Ok(output) => output,
        Err(e) => panic!(
            "cannot run `node` ({e}): the client module's unit tests need Node.js 20 or later \
             (Debian: apt-get install nodejs; tests/run-all.sh installs it)"
        ),
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "node --test tests/js/ failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    // A run that found no test file passes too; it must have run some.
    let passed = stdout
        .lines()
        .find_map(|l| l.strip_prefix("# pass "))
        .and_then(|n| n.trim().parse::<u32>().ok())
        .unwrap_or(0);
    assert!(passed > 0, "node ran no test:\n{stdout}\n{stderr}");
    println!("{passed} node unit tests passed");
}

/// The module's `RESERVED_EVENTS` are the server's `RESERVED_EVENT_TYPES`:
/// the names the server refuses to publish are the names the module keeps
/// from its listeners (`open`, `error`, `*`, `heartbeat`) or takes for the
/// protocol's (`connected`, `reset`).
#[test]
fn the_module_s_reserved_names_are_the_server_s() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let module = std::fs::read_to_string(repo.join("src/js/sse-scale.js")).expect("the module");
    let line = module
        .lines()
        .find(|l| l.starts_with("export const RESERVED_EVENTS"))
        .expect("RESERVED_EVENTS in the module");
    let names: Vec<&str> = line.split('\'').skip(1).step_by(2).collect();
    assert_eq!(names, sse_scale::event::RESERVED_EVENT_TYPES, "{line}");
}
