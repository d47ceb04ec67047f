//! The demo page at `/`: the résumé-writing pipeline as a browser sees it,
//! built on the client module `src/js/sse-scale.js`. The files are
//! embedded in the binary, so the page works wherever the server runs and
//! behind every shipped balancer config, with no separate static hosting.

use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

/// (path, content type, body) of every embedded file.
const FILES: &[(&str, &str, &str)] = &[
    (
        "/",
        "text/html; charset=utf-8",
        include_str!("../static/index.html"),
    ),
    (
        "/app.js",
        "text/javascript; charset=utf-8",
        include_str!("../static/app.js"),
    ),
    (
        "/style.css",
        "text/css; charset=utf-8",
        include_str!("../static/style.css"),
    ),
    (
        "/sse-scale.js",
        "text/javascript; charset=utf-8",
        include_str!("../../src/js/sse-scale.js"),
    ),
];

/// The page loads only its own files and connects only to its origin; it
/// has no inline script or style, and is framed by nobody (clickjacking).
const POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; \
     form-action 'self'; frame-ancestors 'none'";

/// The page's routes, to merge into the application's router.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    FILES
        .iter()
        .fold(Router::new(), |router, (path, kind, body)| {
            router.route(
                path,
                get(move || async move {
                    (
                        [
                            (CONTENT_TYPE, *kind),
                            // A deploy changes the files; a browser asks again.
                            (CACHE_CONTROL, "no-cache"),
                            (CONTENT_SECURITY_POLICY, POLICY),
                            (X_CONTENT_TYPE_OPTIONS, "nosniff"),
                            // Session ids travel in the page's URLs.
                            (REFERRER_POLICY, "no-referrer"),
                        ],
                        *body,
                    )
                        .into_response()
                }),
            )
        })
}
