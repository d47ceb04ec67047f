//! Bench support: the knobs, environment variables every bench reads the
//! same way. An empty variable counts as unset, so `BENCH_X= cargo bench`
//! keeps the default; a value that does not parse stops the bench before it
//! starts anything rather than measuring something else than was asked.

#![allow(dead_code)]

/// The variable `k`, if set and not empty.
pub fn var(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

/// `BENCH_QUICK`: a reduced run, a smoke test of the bench itself.
pub fn quick() -> bool {
    var("BENCH_QUICK").is_some()
}

/// The number in `k`, or `default`.
pub fn num(k: &str, default: f64) -> f64 {
    var(k).map_or(default, |v| {
        v.parse().unwrap_or_else(|_| panic!("{k}: a number"))
    })
}

/// The comma-separated list in `k` (or `default`), trimmed, without empty
/// items.
pub fn list(k: &str, default: &str) -> Vec<String> {
    var(k)
        .unwrap_or_else(|| default.to_owned())
        .split(',')
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .collect()
}
