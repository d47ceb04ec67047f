//! The affinity cookie: names the instance that served the client, so a
//! load balancer without sticky-session support of its own (nginx open
//! source) can map the cookie to the upstream that holds the client's stream.
//!
//! Set on session creation and on every stream open. When a client arrives
//! carrying another instance's name (its instance died and the balancer
//! failed it over), the cookie is rewritten: the client is re-pinned here.

use axum_extra::extract::cookie::{Cookie, CookieJar, SameSite};

#[derive(Debug, Clone)]
pub struct Affinity {
    /// Cookie name; `None` when disabled (`AFFINITY_COOKIE=`).
    name: Option<String>,
    /// Mark `Secure` even without `X-Forwarded-Proto: https`.
    always_secure: bool,
    instance_id: String,
}

impl Affinity {
    pub fn new(name: &str, always_secure: bool, instance_id: &str) -> Self {
        Self {
            name: (!name.is_empty()).then(|| name.to_owned()),
            always_secure,
            instance_id: instance_id.to_owned(),
        }
    }

    /// Adds the cookie to `jar`; `Secure` when the request came `behind_tls`
    /// (`extract::BehindTls`).
    pub fn pin(&self, jar: CookieJar, behind_tls: bool) -> CookieJar {
        let Some(name) = &self.name else { return jar };
        if let Some(prev) = jar.get(name).filter(|c| c.value() != self.instance_id) {
            tracing::debug!(from = prev.value(), to = %self.instance_id, "re-pinning client");
        }
        let cookie = Cookie::build((name.clone(), self.instance_id.clone()))
            .path("/")
            .http_only(true)
            .same_site(SameSite::Lax)
            .secure(self.always_secure || behind_tls);
        jar.add(cookie)
    }
}
