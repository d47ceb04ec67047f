//! What the storm prints: its runs as Markdown tables, from the results
//! as written to storm.json.

use std::fmt::Write as _;

use serde_json::Value;

/// The Markdown tables of the runs, for docs/benchmarks.md: the resume
/// and its cost, its parts, and what the machine went through.
pub fn summary(runs: &[Value]) -> String {
    let mut out = String::new();
    let f = |v: &Value| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.0}"));
    let f2 = |v: &Value| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.2}"));
    // Figures of one object, `a / b / c`.
    let of = |v: &Value, keys: &[&str]| {
        keys.iter()
            .map(|k| f(&v[*k]))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    let (p50_99, p50_99_max) = (["p50_ms", "p99_ms"], ["p50_ms", "p99_ms", "max_ms"]);
    let _ = writeln!(
        out,
        "| run | streams | resumed | lost | duplicated | resets | refused / failed reconnects | \
         time-to-resume (`connected`) p50 / p99 / max ms | beyond the hint p50 / p99 / max ms | \
         to first event p50 / p99 ms | survivors µs CPU per resume (vs after-storm rate) | \
         redis / haproxy / client CPU ms/s: storm (before) |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in runs {
        let t = &r["time_to_resume"];
        let c = &r["cpu"];
        let rate = |k: &str| {
            format!(
                "{} ({})",
                f(&c[k]["storm_cpu_per_s_ms"]),
                f(&c[k]["before_cpu_per_s_ms"])
            )
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} / {} | {} | {} | {} | {} ({}) | {} / {} / {} |",
            r["run"],
            r["streams"],
            r["resumed"],
            r["lost"],
            r["duplicated"],
            r["resets"],
            r["refused_reconnects"],
            r["failed_reconnects"],
            of(&t["connected"], &p50_99_max),
            of(&t["connected_beyond_hint"], &p50_99_max),
            of(&t["first_event"], &p50_99),
            f(&c["survivors"]["us_per_resume"]),
            f(&c["survivors"]["us_per_resume_vs_after"]),
            rate("redis"),
            rate("haproxy"),
            rate("client"),
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| run | disconnect seen after kill p50 / max ms | client woke late after the hint p50 / p99 ms | \
         TCP connect p50 / p99 ms | request → response head p50 / p99 / max ms | head → `connected` p99 ms | \
         late-subscribe warnings app2 + app3 | listen overflows / SYN retransmits | machine busy before / storm (cores busy outside the scenario) | \
         storm window ms | resumed on app2 / app3 |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|");
    for r in runs {
        let p = &r["parts"];
        let late = &r["late_subscribe_warnings"];
        let tcp = &r["tcp_during_storm"];
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} / {} | {} / {} ({} / {}) | {} | {} / {} |",
            r["run"],
            of(&p["disconnect_seen_after_kill"], &["p50_ms", "max_ms"]),
            of(&p["client_wake_late"], &p50_99),
            of(&p["tcp_connect"], &p50_99),
            of(&p["request_to_head"], &p50_99_max),
            f(&p["head_to_connected"]["p99_ms"]),
            late["app2"].as_u64().unwrap_or(0) + late["app3"].as_u64().unwrap_or(0),
            tcp["ListenOverflows"],
            tcp["TCPSynRetrans"],
            f2(&r["machine_busy"]["before"]["share"]),
            f2(&r["machine_busy"]["storm"]["share"]),
            f2(&r["machine_busy"]["before"]["other_cores"]),
            f2(&r["machine_busy"]["storm"]["other_cores"]),
            f(&r["storm_window_ms"]),
            r["resumed_on"]["app2"],
            r["resumed_on"]["app3"],
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| run | deepest accept queue during the storm (backlog): HAProxy 1 / HAProxy 2 / app2 / app3 | publish failures | \
         resumes that found Redis unreachable (reset) | other server warnings | \
         survivors' Redis calls during the storm ≤ 25 ms / 25–250 ms / 0.25–1 s / > 1 s (timed out) | \
         HAProxy → instance connect (`%Tc`) p50 / p99 ms, ≥ 1 s | instance response head (`%Tr`) p50 / p99 ms, ≥ 1.9 s |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for r in runs {
        let q = &r["listen_queues_during_storm"];
        let h = &r["haproxy_timers_of_resumes"];
        let one = |k: &str| format!("{} ({})", q[k]["max_accept_queue"], q[k]["backlog"]);
        let trips = |t: &Value| {
            let Some(m) = t.as_object() else {
                return "-".to_owned();
            };
            let mut sums = [0u64; 4];
            for (k, v) in m {
                let le: f64 = k
                    .trim_start_matches("le ")
                    .trim_end_matches(" s")
                    .parse()
                    .unwrap_or(f64::INFINITY);
                let slot = if le <= 0.025 {
                    0
                } else if le <= 0.25 {
                    1
                } else if le <= 1.0 {
                    2
                } else {
                    3
                };
                sums[slot] += v.as_u64().unwrap_or(0);
            }
            format!("{} / {} / {} / {}", sums[0], sums[1], sums[2], sums[3])
        };
        let _ = writeln!(
            out,
            "| {} | {} / {} / {} / {} | {} | {} | {} | {} | {}, {} | {}, {} |",
            r["run"],
            one("lb0"),
            one("lb1"),
            one("app2"),
            one("app3"),
            r["publish_failures"],
            r["history_unreadable_warnings"],
            r["other_warnings"],
            trips(&r["survivors_redis_round_trips_during_storm"]),
            of(&h["connect_to_instance_Tc"], &p50_99),
            h["connects_of_1s_or_more"],
            of(&h["instance_response_head_Tr"], &p50_99),
            h["heads_held_1_9s_or_more"],
        );
    }
    out
}
