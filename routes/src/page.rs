//! The demo page at `/`: the résumé-writing pipeline as a browser sees it,
//! built on the client module `clients/js/sse-scale.js`. The files are
//! embedded in the binary, so the page works wherever the server runs and
//! behind every shipped balancer config, with no separate static hosting.

use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
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
        include_str!("../../clients/js/sse-scale.js"),
    ),
];

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
                        ],
                        *body,
                    )
                        .into_response()
                }),
            )
        })
}
