//! Bench support: where a bench's results go and how they are written, the
//! same for every bench so `BENCH_OUT` moves all of them.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

/// Where results go: `BENCH_OUT`, a relative path taken from the workspace
/// root (cargo runs benches in `routes/`), or `docs/bench`.
pub fn bench_out() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    match std::env::var_os("BENCH_OUT").filter(|v| !v.is_empty()) {
        Some(out) => root.join(out),
        None => root.join("docs/bench"),
    }
}

/// Writes `value` to `dir/name` as indented JSON with a final newline
/// (creating `dir`); returns the file's path.
pub fn write_json(dir: &Path, name: &str, value: &Value) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    let path = dir.join(name);
    std::fs::write(
        &path,
        serde_json::to_string_pretty(value).expect("json") + "\n",
    )
    .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

/// Counts per 100 ms slot as `[[ms, count], ...]`, the empty slots left
/// out: a timeline that stays short however long the window.
pub fn slots_100ms(counts: impl IntoIterator<Item = u64>) -> Value {
    json!(counts
        .into_iter()
        .enumerate()
        .filter(|(_, n)| *n > 0)
        .map(|(i, n)| json!([i * 100, n]))
        .collect::<Vec<_>>())
}
