//! `FF_REDIS_SSE_BROADCAST` from an Unleash server, so operators can switch
//! cross-instance delivery on and off at run time and roll it out per
//! session (a `flexibleRollout` strategy with stickiness on `sessionId`).
//!
//! Evaluation is done by the official `unleash-api-client` crate on its
//! cached copy of the flag configuration, with the SSE session id as the
//! context's `sessionId`. Unleash hashes `groupId:sessionId` (murmur3), a
//! pure function of the flag configuration and the id, so every instance
//! that has polled the same configuration gives a session the same answer.
//!
//! The client needs help in a few places, which this module supplies:
//! - it does not poll by itself: [`UnleashFlags::start`] spawns the polling
//!   loop as a task owned by the server's [`TaskTracker`] that ends on its
//!   [`CancellationToken`];
//! - its default HTTP transport has no timeout and ignores the status code:
//!   `HttpTransport` has both, so a hung or refusing server counts as a
//!   failed poll instead of stalling the loop or being parsed as flags;
//! - it retries at the same pace whatever the answer: failed polls back off
//!   exponentially (up to [`MAX_BACKOFF`]) and are logged once per outage;
//! - until its first successful fetch it answers `false` whatever default it
//!   is given: until then the value from the environment is used.
//!
//! Precedence, as reported in `/stats`: `unleash` (last poll succeeded),
//! `unleash-last-known` (Unleash answered before but the latest polls
//! failed — in this process, or in any instance of the fleet when a
//! [`LastKnown`] store is given: every successful poll saves the
//! configuration there, and a process that starts while Unleash is down
//! loads it instead of running on the environment value), then `env` /
//! `default` before Unleash ever answered, or when the flag is not defined
//! in Unleash.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use backon::{BackoffBuilder, ExponentialBuilder};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use unleash_api_client::api::{features_endpoint, Metrics};
use unleash_api_client::client::FeatureKey;
use unleash_api_client::http::{Method, Request, Response, Transport};
use unleash_api_client::{Client, ClientBuilder, Context};
use unleash_types::client_features::ClientFeatures;

use crate::event::SessionId;
use crate::flags::{EnvFlags, FlagSource, FlagState, REDIS_SSE_BROADCAST};

/// Longest wait between polls while Unleash keeps failing.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Longest a single request to Unleash may take.
const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The flags this crate asks Unleash about.
#[derive(Debug, Clone, Copy)]
enum Flag {
    RedisSseBroadcast,
}

impl FeatureKey for Flag {
    fn name(self) -> &'static str {
        match self {
            Flag::RedisSseBroadcast => REDIS_SSE_BROADCAST,
        }
    }
}

/// How to reach Unleash (see the `UNLEASH_*` variables in
/// server configuration).
#[derive(Clone)]
#[non_exhaustive]
pub struct UnleashSettings {
    /// The client API base, e.g. `http://unleash:4242/api`.
    pub url: String,
    /// Backend (client) API token, sent as `Authorization`.
    pub api_token: Option<String>,
    pub app_name: String,
    pub instance_id: String,
    /// Time between polls while Unleash answers.
    pub refresh: Duration,
    /// `FF_REDIS_SSE_BROADCAST` from the environment, used until Unleash
    /// first answers.
    pub env_value: Option<bool>,
    /// Where the last configuration Unleash answered is kept for processes
    /// that start while it is down (the shared Redis, in a fleet).
    pub last_known: Option<Arc<dyn LastKnown>>,
}

/// A store for the last flag configuration Unleash answered, shared by the
/// fleet.
pub trait LastKnown: Send + Sync + 'static {
    fn load(&self) -> futures::future::BoxFuture<'_, Option<String>>;
    fn save(&self, configuration: String) -> futures::future::BoxFuture<'_, ()>;
}

/// [`LastKnown`] in the shared Redis, under `<prefix>flags:unleash`.
#[cfg(feature = "redis")]
pub struct RedisLastKnown {
    redis: crate::redis_client::SharedRedis,
    key: String,
}

#[cfg(feature = "redis")]
impl RedisLastKnown {
    pub fn new(redis: crate::redis_client::SharedRedis, prefix: &str) -> Self {
        Self {
            redis,
            key: format!("{prefix}flags:unleash"),
        }
    }
}

#[cfg(feature = "redis")]
impl LastKnown for RedisLastKnown {
    fn load(&self) -> futures::future::BoxFuture<'_, Option<String>> {
        use futures::FutureExt;
        async move {
            let mut cmd = redis::cmd("GET");
            cmd.arg(&self.key);
            let cmd = &cmd;
            self.redis
                .call(|mut c| async move { cmd.query_async::<Option<String>>(&mut c).await })
                .await
                .ok()
                .flatten()
        }
        .boxed()
    }

    fn save(&self, configuration: String) -> futures::future::BoxFuture<'_, ()> {
        use futures::FutureExt;
        async move {
            let mut cmd = redis::cmd("SET");
            // Kept a week: long enough for any outage, gone with the fleet.
            cmd.arg(&self.key)
                .arg(configuration)
                .arg("EX")
                .arg(7 * 86_400);
            let cmd = &cmd;
            if let Err(e) = self
                .redis
                .call(|mut c| async move { cmd.query_async::<()>(&mut c).await })
                .await
            {
                tracing::debug!(error = %e, "cannot save the flag configuration");
            }
        }
        .boxed()
    }
}

impl UnleashSettings {
    pub fn new(url: impl Into<String>, app_name: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            api_token: None,
            app_name: app_name.into(),
            instance_id: String::new(),
            refresh: Duration::from_secs(15),
            env_value: None,
            last_known: None,
        }
    }
}

impl std::fmt::Debug for UnleashSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnleashSettings")
            .field("url", &self.url)
            .field("api_token", &self.api_token.as_ref().map(|_| "<redacted>"))
            .field("app_name", &self.app_name)
            .field("instance_id", &self.instance_id)
            .field("refresh", &self.refresh)
            .field("env_value", &self.env_value)
            .finish()
    }
}

/// Unleash has not answered yet.
const NEVER: u8 = 0;
/// The latest poll succeeded.
const FRESH: u8 = 1;
/// Unleash answered before, but the latest poll failed.
const STALE: u8 = 2;

/// The flag is not defined in Unleash (the environment value applies).
const UNDEFINED: u8 = 0;
/// Defined and switched off in the environment.
const OFF: u8 = 1;
/// Defined and switched on: its strategies decide per session.
const ON: u8 = 2;

/// A [`FlagSource`] backed by Unleash. Cheap to clone.
#[derive(Clone)]
pub struct UnleashFlags {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client<Flag>,
    /// Answers until Unleash first does, and for a flag Unleash lacks.
    env: EnvFlags,
    status: AtomicU8,
    /// [`UNDEFINED`], [`OFF`] or [`ON`], from the latest configuration.
    toggle: AtomicU8,
    app_name: String,
}

impl UnleashFlags {
    /// Builds the client and spawns its polling task on `tasks`; the task
    /// stops when `cancel` fires. Fails only on a client that cannot be
    /// built (the HTTP transport).
    pub fn start(
        settings: UnleashSettings,
        tasks: &TaskTracker,
        cancel: CancellationToken,
    ) -> anyhow::Result<Self> {
        let flags = Self::new(&settings)?;
        tasks.spawn(flags.clone().poll(settings, cancel));
        Ok(flags)
    }

    /// The source without its polling task: answers from the environment
    /// until [`poll_once`](Self::poll_once) succeeds.
    fn new(settings: &UnleashSettings) -> anyhow::Result<Self> {
        let transport = HttpTransport::new(request_timeout(settings.refresh))?;
        let client = ClientBuilder::default()
            // The interval is sent to Unleash for its dashboards; the
            // polling loop below keeps its own time.
            .interval(settings.refresh.as_millis().try_into().unwrap_or(u64::MAX))
            // Harmless with the typed key used here, and keeps string lookups
            // (which panic without it) available.
            .enable_string_features()
            .into_client_with_transport::<Flag>(
                &settings.url,
                &settings.app_name,
                &settings.instance_id,
                settings.api_token.clone(),
                Arc::new(transport),
            )?;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                env: EnvFlags::new(settings.env_value),
                status: AtomicU8::new(NEVER),
                toggle: AtomicU8::new(UNDEFINED),
                app_name: settings.app_name.clone(),
            }),
        })
    }

    /// Fetches the flag configuration once and caches it; metrics collected
    /// since the previous fetch are sent along (best effort).
    async fn poll_once(&self, settings: &UnleashSettings) -> anyhow::Result<()> {
        let client = &self.inner.client;
        let interval = Some(settings.refresh.as_millis().try_into().unwrap_or(u64::MAX));
        let features: ClientFeatures = client
            .http
            .get_json(&features_endpoint(&settings.url), interval)
            .await?;
        if let Some(store) = &settings.last_known {
            if let Ok(json) = serde_json::to_string(&features) {
                store.save(json).await;
            }
        }
        let metrics = self.apply(features)?;
        self.inner.status.store(FRESH, Ordering::Release);
        if let Some(metrics) = metrics {
            let sent = client
                .http
                .post_json(&Metrics::endpoint(&settings.url), metrics, interval)
                .await;
            if let Err(e) = sent {
                tracing::debug!(error = %e, "cannot send flag metrics to Unleash");
            }
        }
        Ok(())
    }

    /// Makes `features` the configuration flags are evaluated on.
    fn apply(
        &self,
        features: ClientFeatures,
    ) -> anyhow::Result<Option<unleash_api_client::api::Metrics>> {
        let toggle = match features
            .features
            .iter()
            .find(|f| f.name == REDIS_SSE_BROADCAST)
        {
            None => UNDEFINED,
            Some(f) if f.enabled => ON,
            Some(_) => OFF,
        };
        let metrics = self
            .inner
            .client
            .memoize(features)
            .map_err(|e| anyhow::anyhow!("cannot use the flag configuration: {e}"))?;
        self.inner.toggle.store(toggle, Ordering::Release);
        Ok(metrics)
    }

    /// Before Unleash ever answered this process: the configuration the
    /// fleet last got from it, if the store has one.
    async fn load_last_known(&self, settings: &UnleashSettings) -> bool {
        let Some(store) = &settings.last_known else {
            return false;
        };
        let Some(json) = store.load().await else {
            return false;
        };
        let Ok(features) = serde_json::from_str::<ClientFeatures>(&json) else {
            tracing::warn!("the stored flag configuration does not parse; ignored");
            return false;
        };
        if self.apply(features).is_err() {
            return false;
        }
        self.inner.status.store(STALE, Ordering::Release);
        tracing::info!(
            "Unleash is unreachable: following the flag configuration the fleet last got from it"
        );
        true
    }

    /// Polls every `refresh` while Unleash answers; after a failure, backs
    /// off exponentially and logs the outage once (and its end once).
    async fn poll(self, settings: UnleashSettings, cancel: CancellationToken) {
        let client = &self.inner.client;
        let mut registered = false;
        let mut backoff = None;
        loop {
            let result = tokio::select! {
                r = self.poll_once(&settings) => r,
                () = cancel.cancelled() => return,
            };
            let wait = match result {
                Ok(()) => {
                    if !registered {
                        registered = true;
                        // After the first answer, so registering (for
                        // Unleash's dashboards only) never delays the flag.
                        tokio::select! {
                            r = client.register() => if let Err(e) = r {
                                tracing::debug!(error = %e, "cannot register with Unleash");
                            },
                            () = cancel.cancelled() => return,
                        }
                    }
                    if backoff.take().is_some() {
                        tracing::info!(url = %settings.url, "Unleash answers again; following it");
                    }
                    settings.refresh
                }
                Err(e) => {
                    if self.inner.status.load(Ordering::Acquire) == NEVER {
                        self.load_last_known(&settings).await;
                    }
                    let delays = backoff.get_or_insert_with(|| {
                        let status = self.inner.status.load(Ordering::Acquire);
                        let fallback = if status == NEVER {
                            "the environment value"
                        } else {
                            "the last known Unleash value"
                        };
                        tracing::warn!(
                            url = %settings.url,
                            error = format!("{e:#}"),
                            "Unleash is unreachable or refuses the token; using {fallback} \
                             until it answers (retrying with backoff)"
                        );
                        ExponentialBuilder::new()
                            .with_min_delay(settings.refresh)
                            .with_max_delay(MAX_BACKOFF.max(settings.refresh))
                            .with_jitter()
                            .without_max_times()
                            .build()
                    });
                    let _ = self.inner.status.compare_exchange(
                        FRESH,
                        STALE,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                    tracing::debug!(error = format!("{e:#}"), "Unleash poll failed");
                    delays.next().unwrap_or(MAX_BACKOFF)
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = cancel.cancelled() => return,
            }
        }
    }

    fn context(&self, session: &SessionId) -> Context {
        Context {
            session_id: Some(session.to_string()),
            app_name: self.inner.app_name.clone(),
            ..Context::default()
        }
    }
}

impl FlagSource for UnleashFlags {
    fn redis_broadcast(&self, session: &SessionId) -> bool {
        if self.inner.status.load(Ordering::Acquire) == NEVER
            || self.inner.toggle.load(Ordering::Acquire) == UNDEFINED
        {
            return self.inner.env.get();
        }
        let ctx = self.context(session);
        self.inner
            .client
            .is_enabled(Flag::RedisSseBroadcast, Some(&ctx), false)
    }

    /// `enabled` is the flag's switch in the Unleash environment: on means
    /// its strategies (the rollout) decide per session.
    fn state(&self) -> FlagState {
        let source = match self.inner.status.load(Ordering::Acquire) {
            NEVER => return self.inner.env.state(),
            FRESH => "unleash",
            _ => "unleash-last-known",
        };
        match self.inner.toggle.load(Ordering::Acquire) {
            UNDEFINED => self.inner.env.state(),
            toggle => FlagState {
                enabled: toggle == ON,
                source: source.to_owned(),
            },
        }
    }
}

/// Each request may take up to the refresh interval, within 1 to 10 s.
fn request_timeout(refresh: Duration) -> Duration {
    refresh.clamp(Duration::from_secs(1), MAX_REQUEST_TIMEOUT)
}

/// The client's HTTP transport: reqwest with a timeout, and any status other
/// than 2xx turned into an error naming it (401/403: the token).
struct HttpTransport {
    client: reqwest::Client,
}

impl HttpTransport {
    fn new(timeout: Duration) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()?;
        Ok(Self { client })
    }
}

#[async_trait]
impl Transport for HttpTransport {
    async fn execute(&self, request: Request) -> anyhow::Result<Response> {
        let mut builder = match request.method {
            Method::Get => self.client.get(&request.url),
            Method::Post => self.client.post(&request.url),
        };
        for (name, value) in request.headers {
            builder = builder.header(name, value);
        }
        if let Some(body) = request.body {
            builder = builder
                .header("content-type", "application/json")
                .body(body);
        }
        let response = builder.send().await?;
        let status = response.status();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            anyhow::bail!(
                "{} refused the API token (HTTP {status}); check UNLEASH_API_TOKEN",
                request.url
            );
        }
        if !status.is_success() {
            anyhow::bail!("{} answered HTTP {status}", request.url);
        }
        let body = response.bytes().await?.to_vec();
        Ok(Response {
            status: status.as_u16(),
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str, env: Option<bool>) -> UnleashSettings {
        let mut s = UnleashSettings::new(url, "test");
        s.env_value = env;
        s.api_token = Some("secret-token".into());
        s
    }

    #[test]
    fn answers_from_the_environment_before_unleash_answered() {
        let s = SessionId::parse("s1").unwrap();
        let on = UnleashFlags::new(&settings("http://127.0.0.1:9/api", Some(true))).unwrap();
        assert!(on.redis_broadcast(&s));
        assert_eq!(on.state().source, "env");
        let unset = UnleashFlags::new(&settings("http://127.0.0.1:9/api", None)).unwrap();
        assert!(!unset.redis_broadcast(&s));
        assert_eq!(unset.state().source, "default");
    }

    #[tokio::test]
    async fn an_unreachable_server_is_an_error_not_a_hang() {
        let st = settings("http://127.0.0.1:9/api", Some(true));
        let flags = UnleashFlags::new(&st).unwrap();
        assert!(flags.poll_once(&st).await.is_err());
        assert!(flags.redis_broadcast(&SessionId::parse("s").unwrap()));
    }

    #[test]
    fn debug_hides_the_token() {
        let s = format!("{:?}", settings("http://u/api", None));
        assert!(!s.contains("secret-token"), "{s}");
    }

    #[test]
    fn request_timeout_stays_within_bounds() {
        assert_eq!(
            request_timeout(Duration::from_millis(10)),
            Duration::from_secs(1)
        );
        assert_eq!(
            request_timeout(Duration::from_secs(5)),
            Duration::from_secs(5)
        );
        assert_eq!(
            request_timeout(Duration::from_secs(600)),
            MAX_REQUEST_TIMEOUT
        );
    }
}
