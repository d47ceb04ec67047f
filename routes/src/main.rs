//! The `sse-scale` server binary: reads the configuration, picks the
//! broadcaster, serves until SIGTERM/SIGINT, then shuts down within
//! `SHUTDOWN_GRACE_SECS`.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use sse_scale::ratelimit::RateLimiter;
use sse_scale::unleash::UnleashSettings;
use sse_scale::{SseScale, TokenSigner};
use sse_scale_server::admission::Refusal;
use sse_scale_server::config::{Adapter, Command, Config, LogFormat};
use sse_scale_server::state::{AppState, Services};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing_subscriber::EnvFilter;

/// The reference server's allocator (the library leaves the choice to its
/// user): see `routes/Cargo.toml` for what it buys.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // clap prints the problem and exits with code 2 on a bad value.
    let config = Config::parse();
    if let Some(Command::Doctor(args)) = &config.command {
        return sse_scale_server::doctor::main(args.clone());
    }
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // A log line that cannot be written (stderr's reader went away) is lost,
    // not reported with `eprintln!`, which panics on the same closed pipe
    // and would take the logging task with it — the signal task included,
    // leaving SIGTERM ignored.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    match config.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
    }
    // Every open stream is a socket, and the usual soft open-file limit
    // (1024) would refuse connections long before MAX_STREAMS; the hard limit
    // is what the operator meant to allow.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::info!(limit, "open-file limit raised to the hard limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    if let Err(e) = config.validate() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "server failed");
            ExitCode::FAILURE
        }
    }
}

/// Pending connections the kernel queues for `accept` (capped by
/// `net.core.somaxconn`). The default of 128 overflows when the clients of
/// a dead instance all come back at once: dropped SYNs are retried after a
/// second, which lands on every one of them.
const LISTEN_BACKLOG: u32 = 4096;

async fn listen(host: &str, port: u16) -> std::io::Result<TcpListener> {
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket
            .bind(addr)
            .and_then(|()| socket.listen(LISTEN_BACKLOG))
        {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("the host name resolves to no address")))
}

async fn run(config: Config) -> anyhow::Result<()> {
    let listener = listen(&config.host, config.port)
        .await
        .with_context(|| format!("cannot listen on {}:{}", config.host, config.port))?;
    let addr = listener.local_addr()?;
    let instance_id = config.instance_id.clone().unwrap_or_else(|| {
        format!(
            "{}:{}",
            gethostname::gethostname().to_string_lossy(),
            addr.port()
        )
    });
    let signer = match &config.session_secret {
        Some(secret) => match &config.session_secret_previous {
            Some(previous) => TokenSigner::new(secret).with_previous(previous),
            None => TokenSigner::new(secret),
        }
        .with_max_ttl(Duration::from_secs(config.session_token_ttl_secs)),
        None => {
            tracing::warn!(
                "SESSION_SECRET is not set: using a random secret; every instance of a \
                 multi-instance deployment must share one SESSION_SECRET"
            );
            TokenSigner::random()
        }
    };
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();

    // The toolkit, through its public builder: the broadcaster, the control
    // bus, the flag source and the one Redis client of the process (shared
    // with the rate limiter).
    let mut builder = SseScale::builder()
        .instance_id(&instance_id)
        .queue(config.sse_client_queue as usize)
        .history(config.history())
        .replay_max_bytes(config.replay_max_bytes as usize)
        .replay_budget((config.replay_budget_mb as usize) << 20)
        .heartbeat(config.heartbeat())
        .retry(config.retry())
        .resume_rate(config.resume_rate())
        .drain_window(config.shutdown_drain());
    if let Some(on) = config.ff_redis_sse_broadcast {
        builder = builder.flag(on);
    }
    if let Some(topology) = config.redis_topology() {
        builder = builder
            .redis_topology(topology)
            .redis_prefix(&config.redis_prefix)
            .outbox_max(config.outbox_max as usize);
        if config.adapter() == Adapter::Memory {
            builder = builder.local_broadcast();
        }
    }
    if let Some(url) = &config.unleash_url {
        let mut settings = UnleashSettings::new(url, &config.unleash_app_name);
        settings.api_token = config.unleash_api_token.clone();
        settings.instance_id = config
            .unleash_instance_id
            .clone()
            .unwrap_or_else(|| instance_id.clone());
        settings.refresh = config.unleash_refresh();
        tracing::info!(%url, refresh_secs = config.unleash_refresh_secs, "flags from Unleash");
        builder = builder.unleash(settings);
    }
    let scale = Arc::new(builder.build()?);
    let limiter = RateLimiter::new(scale.redis().cloned(), &config.redis_prefix);
    let control_rx = scale.control().take_receiver();
    let services = Services {
        scale,
        limiter,
        signer,
        shutdown,
        tasks,
    };
    let state = Arc::new(AppState::new(&config, services));
    if let Some(rx) = control_rx {
        state.tasks.spawn(
            state
                .runs
                .clone()
                .serve_control(rx, state.drain.shutdown.clone()),
        );
    }
    let app =
        sse_scale_server::app(state.clone()).context("INSTANCE_ID is not a valid header value")?;

    // Signals are caught from here on: the "listening" line below is what
    // supervisors (and the tests) wait for before they may send SIGTERM.
    let signal = sse_scale::axum::terminate();
    tracing::info!(%addr, instance_id = %state.settings.instance_id, mode = state.broadcaster.stats().mode, "listening");
    // SIGTERM: unready at once, so the balancer takes this instance out
    // before any stream closes (SHUTDOWN_UNREADY_SECS); then streams close
    // spread over the drain window (publishes keep working meanwhile), and
    // the server stops as soon as the last stream is gone.
    let signal_state = state.clone();
    let unready_for = config.shutdown_unready();
    state.tasks.spawn(async move {
        tokio::select! {
            () = signal => {}
            () = signal_state.drain.shutdown.cancelled() => {}
        }
        signal_state.start_unready();
        tracing::info!(
            unready_secs = unready_for.as_secs_f64(),
            "unready: waiting for the balancer to take this instance out"
        );
        tokio::select! {
            () = tokio::time::sleep(unready_for) => {}
            () = signal_state.drain.shutdown.cancelled() => {}
        }
        signal_state.close_streams();
        tracing::info!(
            window_secs = signal_state.drain.window.as_secs_f64(),
            streams = signal_state
                .counters
                .open_streams
                .load(std::sync::atomic::Ordering::Relaxed),
            "draining"
        );
        let deadline = tokio::time::Instant::now() + signal_state.drain.window;
        while tokio::time::Instant::now() < deadline
            && signal_state
                .counters
                .open_streams
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
            && !signal_state.drain.shutdown.is_cancelled()
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        signal_state.drain.shutdown.cancel();
    });

    let limits = sse_scale_server::serve::Limits {
        write_timeout: Duration::from_secs(config.sse_write_timeout_secs),
        head_timeout: config.request_head_timeout(),
        request_timeout: config.request_timeout(),
        max_pending_heads: config.max_pending_heads as usize,
        stalled: state.counters.stalled_writes_cut.clone(),
        heads_refused: state.counters.heads_refused.clone(),
        first_request_streams: state.counters.stream_opens_first_request.clone(),
        admission: state.admission.clone(),
        over_address: sse_scale_server::refusal_app(state.clone(), Refusal::PerAddress),
        over_instance: sse_scale_server::refusal_app(state.clone(), Refusal::Full),
    };
    let serve = sse_scale_server::serve::serve(listener, app, limits, state.drain.shutdown.clone());
    let grace = config.shutdown_grace();
    // The order matters: runs stop and publish their last events while the
    // broadcaster still takes them; then the toolkit flushes its outbox and
    // closes its brokers, the control bus and the Redis client.
    let served = async {
        serve.await?;
        tracing::info!("stopped accepting; waiting for runs to finish");
        state.tasks.close();
        state.tasks.wait().await;
        tracing::info!("closing the broadcaster");
        state.scale.shutdown().await;
        Ok::<(), std::io::Error>(())
    };
    tokio::pin!(served);
    tokio::select! {
        r = &mut served => r?,
        () = async { state.drain.closing.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(grace_secs = grace.as_secs(), "shutdown grace period elapsed; exiting");
        }
    }
    tracing::info!("shut down");
    Ok(())
}
