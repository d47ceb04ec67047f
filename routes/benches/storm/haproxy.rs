//! The storm's balancers: HAProxy processes running the shipped file, and
//! what their logs say about the resumes they passed on.

use std::net::SocketAddr;

use serde_json::{json, Value};

use crate::support::balancer::Balancer;
use crate::tally::pcts;

/// `haproxy -db -f lb-config/haproxy/haproxy.cfg`, the shipped file
/// unchanged, configured through its environment variables as
/// lb-config/README.md documents (`tests/support/balancer.rs`).
pub struct Haproxy {
    pub lb: Balancer,
}

impl Haproxy {
    pub async fn start(apps: &[SocketAddr; 3]) -> Haproxy {
        let apps = apps.map(|a| a.to_string());
        let lb = Balancer::haproxy(
            "haproxy/haproxy.cfg",
            &[apps[0].as_str(), apps[1].as_str(), apps[2].as_str()],
            &[],
        )
        .await;
        Haproxy { lb }
    }

    pub fn addr(&self) -> SocketAddr {
        self.lb.addr.parse().expect("balancer address")
    }

    fn log(&self) -> String {
        self.lb.log()
    }

    /// HAProxy's own timers of the streams it sent to app2/app3 (the
    /// resumes), from its log (`%Tc`: connect to the instance, `%Tr`: the
    /// instance's response head), in ms, and how many it retried.
    pub fn resume_timers(&self) -> (Vec<u64>, Vec<u64>, u64) {
        let (mut tc, mut tr, mut retried) = (Vec::new(), Vec::new(), 0);
        for line in self.log().lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            // `%ci:%cp [%tr] %ft %b/%s %TR/%Tw/%Tc/%Tr/%Ta %ST ... %ac/%fc/%bc/%sc/%rc`
            // Streams go to the `streams` backend (lb-config/README.md).
            if f.len() < 11
                || !matches!(
                    f[3],
                    "streams/app2" | "streams/app3" | "app/app2" | "app/app3"
                )
                || !line.contains("/events ")
            {
                continue;
            }
            let t: Vec<&str> = f[4].split('/').collect();
            if let (Some(c), Some(r)) = (t.get(2), t.get(3)) {
                if let (Ok(c), Ok(r)) = (c.parse::<i64>(), r.parse::<i64>()) {
                    tc.push(c.max(0) as u64 * 1000);
                    tr.push(r.max(0) as u64 * 1000);
                }
            }
            if f[10].rsplit('/').next().is_some_and(|rc| rc != "0") {
                retried += 1;
            }
        }
        (tc, tr, retried)
    }

    /// Lines of the log mentioning `needle` (state changes, errors).
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    }
}

/// What the balancers' logs say about the storm: when each one's health
/// check took app1 out (first line each), and HAProxy's own timers of the
/// resumes it sent to the survivors.
pub fn resume_figures(lbs: &[Haproxy]) -> (Vec<String>, Value) {
    let down_log: Vec<String> = lbs
        .iter()
        .filter_map(|l| l.log_lines("app1 is DOWN").into_iter().next())
        .collect();
    let (mut lb_tc, mut lb_tr, mut lb_retried) = (Vec::new(), Vec::new(), 0);
    for l in lbs {
        let (c, r, n) = l.resume_timers();
        lb_tc.extend(c);
        lb_tr.extend(r);
        lb_retried += n;
    }
    let slow_connects = lb_tc.iter().filter(|&&c| c >= 1_000_000).count();
    let held_heads = lb_tr.iter().filter(|&&r| r >= 1_900_000).count();
    let timers = json!({
        "connect_to_instance_Tc": pcts(lb_tc),
        "instance_response_head_Tr": pcts(lb_tr),
        "connects_of_1s_or_more": slow_connects,
        "heads_held_1_9s_or_more": held_heads,
        "retried": lb_retried,
    });
    (down_log, timers)
}
