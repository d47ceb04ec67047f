//! One run of the storm: the processes, the streams pinned to app1, the
//! kill, and the run's result as written to storm.json.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use crate::apps::App;
use crate::client::{run_client, Client, Ctx};
use crate::haproxy::{resume_figures, Haproxy};
use crate::publish::publish;
use crate::sampler::{Sampler, Windows};
use crate::support::procs::ADMIN;
use crate::support::redis_server::RedisServer;
use crate::support::sse_client::{create_session, stats, Session, OPEN_CONCURRENCY};
use crate::tally::tally;
use crate::watch::{redis_round_trips, round_trip_delta, tcp_counters, tcp_delta, watch_listeners};
use crate::Options;

/// One run, on fresh processes: every stream opened through the balancers
/// onto app1, steady publishing to the survivors, app1 killed after the
/// warm-up, and every client's resume watched until all caught up.
pub fn run(opts: &Options, run_no: usize) -> Value {
    let wall = Instant::now();
    let redis = RedisServer::start();
    let mut apps = [
        App::start("app1", &redis, opts.retry_ms),
        App::start("app2", &redis, opts.retry_ms),
        App::start("app3", &redis, opts.retry_ms),
    ];
    let addrs = [
        apps[0].server.addr,
        apps[1].server.addr,
        apps[2].server.addr,
    ];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let lbs = rt.block_on(async { [Haproxy::start(&addrs).await, Haproxy::start(&addrs).await] });
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .expect("client");
    let survivors = [addrs[1], addrs[2]];

    // Sessions, created on the survivors (tokens are valid everywhere).
    let sessions: Vec<Arc<Session>> = rt.block_on(async {
        futures::stream::iter(0..opts.sessions)
            .map(|i| {
                let http = http.clone();
                let addr = survivors[i % 2];
                async move { Arc::new(create_session(&http, addr).await) }
            })
            .buffered(32)
            .collect()
            .await
    });
    let per_session = opts.streams / opts.sessions;
    let streams = per_session * opts.sessions;
    let ctx = Arc::new(Ctx {
        base: Instant::now(),
        lbs: lbs.iter().map(Haproxy::addr).collect(),
        session_of: (0..streams).map(|i| i / per_session).collect(),
        sessions: sessions.clone(),
        clients: (0..streams).map(|_| Client::default()).collect(),
        killed: AtomicBool::new(false),
        opened: AtomicUsize::new(0),
        open_failed: AtomicUsize::new(0),
        resumed: AtomicUsize::new(0),
    });

    // Every stream through the balancers, pinned to app1.
    let open_start = Instant::now();
    let tasks: Vec<tokio::task::JoinHandle<()>> = rt.block_on(async {
        let gate = Arc::new(Semaphore::new(OPEN_CONCURRENCY));
        let mut tasks = Vec::with_capacity(streams);
        for i in 0..streams {
            let permit = gate.clone().acquire_owned().await.expect("semaphore");
            tasks.push(tokio::spawn(run_client(ctx.clone(), i, permit)));
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while ctx.opened.load(Ordering::Relaxed) + ctx.open_failed.load(Ordering::Relaxed) < streams
        {
            assert!(Instant::now() < deadline, "streams did not open in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tasks
    });
    let open_secs = open_start.elapsed().as_secs_f64();
    let open_failed = ctx.open_failed.load(Ordering::Relaxed);
    assert_eq!(open_failed, 0, "streams failed to open");
    let pinned = ctx
        .clients
        .iter()
        .filter(|c| c.pinned.load(Ordering::Relaxed))
        .count();
    let held: Vec<u64> = rt.block_on(async {
        let mut v = Vec::new();
        for a in &addrs {
            v.push(
                stats(&http, *a, ADMIN).await["open_streams"]
                    .as_u64()
                    .unwrap_or(0),
            );
        }
        v
    });
    println!(
        "run {run_no}: {streams} streams open in {open_secs:.1} s through 2 HAProxy processes; \
         X-Instance-Id app1 on {pinned}; open_streams app1/app2/app3 = {}/{}/{}",
        held[0], held[1], held[2]
    );
    assert_eq!(pinned, streams, "not every stream is held by app1");
    assert_eq!(
        held[0] as usize, streams,
        "app1's /stats does not hold every stream"
    );

    // Index: 0 app2, 1 app3, 2 redis, 3 lb0, 4 lb1, 5 this process, 6
    // app1 (until killed); then the machine's busy and total jiffies.
    let pids = vec![
        apps[1].server.pid(),
        apps[2].server.pid(),
        redis.pid(),
        lbs[0].lb.pid(),
        lbs[1].lb.pid(),
        std::process::id(),
        apps[0].server.pid(),
    ];
    let mut sampler = Sampler::start(pids.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = rt.spawn(publish(
        http.clone(),
        sessions.clone(),
        survivors,
        opts.rate,
        stop.clone(),
    ));
    std::thread::sleep(opts.warmup);

    // The kill.
    ctx.killed.store(true, Ordering::Relaxed);
    let trips_before: Vec<Vec<(String, u64)>> = rt.block_on(async {
        vec![
            redis_round_trips(&http, survivors[0]).await,
            redis_round_trips(&http, survivors[1]).await,
        ]
    });
    let tcp_before = tcp_counters();
    let watch_stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_listeners(
        vec![
            ("lb0".to_owned(), lbs[0].addr().port()),
            ("lb1".to_owned(), lbs[1].addr().port()),
            ("app2".to_owned(), addrs[1].port()),
            ("app3".to_owned(), addrs[2].port()),
            ("redis".to_owned(), redis.port),
        ],
        watch_stop.clone(),
    );
    let kill_at = Instant::now();
    let kill_us = ctx.now();
    apps[0].kill();
    let deadline = kill_at + Duration::from_secs(60);
    while ctx.resumed.load(Ordering::Relaxed) < streams && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let resumed = ctx.resumed.load(Ordering::Relaxed);
    let last_resume_us = ctx
        .clients
        .iter()
        .map(|c| c.resumed_at.load(Ordering::Relaxed))
        .max()
        .unwrap_or(kill_us);
    let storm_end = ctx.base + Duration::from_micros(last_resume_us) + Duration::from_secs(1);
    while Instant::now() < storm_end {
        std::thread::sleep(Duration::from_millis(10));
    }
    let tcp_storm = tcp_delta(&tcp_before, &tcp_counters());
    let trips_after: Vec<Vec<(String, u64)>> = rt.block_on(async {
        vec![
            redis_round_trips(&http, survivors[0]).await,
            redis_round_trips(&http, survivors[1]).await,
        ]
    });
    let round_trips = round_trip_delta(&trips_before, &trips_after);
    watch_stop.store(true, Ordering::Relaxed);
    let listen_queues = watcher.join().expect("listener watcher");
    std::thread::sleep(opts.tail);
    let after_end = Instant::now();
    stop.store(true, Ordering::Relaxed);
    let (published, publish_failures) = rt.block_on(publisher).expect("publisher");

    // Let every stream catch up with what was published.
    let caught_up = |c: &Client, s: usize| c.next_seq.load(Ordering::Relaxed) >= published[s];
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline
        && !ctx
            .clients
            .iter()
            .enumerate()
            .all(|(i, c)| caught_up(c, ctx.session_of[i]))
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    sampler.finish();
    let survivor_stats: Vec<Value> = rt.block_on(async {
        let mut v = Vec::new();
        for a in &survivors {
            v.push(stats(&http, *a, ADMIN).await);
        }
        v
    });
    for t in &tasks {
        t.abort();
    }

    // CPU: the storm window, the same length of steady publishing before
    // the kill, and after the storm.
    let windows = Windows::of(&sampler, kill_at, storm_end, after_end, opts.warmup);
    let [storm_ms, before_ms, after_ms] = windows.lengths_ms();
    let clients = tally(&ctx, &published, kill_us);
    let (lb_log, lb_timers) = resume_figures(&lbs);
    let total_published: u64 = published.iter().sum();
    let mut result = json!({
        "run": run_no,
        "streams": streams,
        "sessions": opts.sessions,
        "streams_per_session": per_session,
        "balancers": 2,
        "publish_rate": opts.rate,
        "published": total_published,
        "publish_failures": publish_failures,
        "open_secs": open_secs,
        "resumed": resumed,
        "haproxy_timers_of_resumes": lb_timers,
        "storm_window_ms": storm_ms,
        "baseline_window_ms": before_ms,
        "after_window_ms": after_ms,
        "cpu": {
            "survivors": windows.cpu_of(&[0, 1], resumed),
            "redis": windows.cpu_of(&[2], resumed),
            "haproxy": windows.cpu_of(&[3, 4], resumed),
            "client": windows.cpu_of(&[5], resumed),
        },
        "survivor_stats": survivor_stats.iter().map(|s| json!({
            "instance": s["instance_id"],
            "open_streams": s["open_streams"],
            "resumes": s["resumes"],
            "resets": s["resets"],
            "streams_refused": s["streams_refused"],
            "slow_consumers_cut": s["slow_consumers_cut"],
            "redis": s["redis"],
        })).collect::<Vec<_>>(),
        "late_subscribe_warnings": { "app2": apps[1].late_subscribes.load(Ordering::Relaxed), "app3": apps[2].late_subscribes.load(Ordering::Relaxed) },
        "history_unreadable_warnings": apps.iter().map(|a| a.history_unreadable.load(Ordering::Relaxed)).sum::<u64>(),
        "other_warnings": apps.iter().map(|a| a.warnings.load(Ordering::Relaxed)).sum::<u64>(),
        "tcp_during_storm": tcp_storm,
        "survivors_redis_round_trips_during_storm": round_trips,
        "listen_queues_during_storm": listen_queues,
        "machine_busy": windows.machine_busy(pids.len()),
        "haproxy_down_log": lb_log,
        "wall_secs": wall.elapsed().as_secs_f64(),
    });
    if let Value::Object(m) = &mut result {
        m.extend(clients);
    }
    drop(rt);
    drop(lbs);
    drop(apps);
    drop(redis);
    result
}
