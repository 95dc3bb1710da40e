//! The admin listener's endpoints: `/healthz`, `/readyz`, `/metrics`, and the
//! operator link API under `/links` ([`links`], behind `[admin] token`).
//!
//! They live on a separate listener so the proxy port never exposes them and an
//! orchestrator can probe a busy proxy. `/healthz` answers 200 while the process
//! serves at all; `/readyz` answers 200 only when the link store is reachable and
//! fully migrated, so a replica without its database is taken out of rotation;
//! `/metrics` renders the registry passed in (never a global).

pub mod links;

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;

use crate::store::LinkStore;
use crate::telemetry::Metrics;

/// Content type of the metrics text (`prometheus-client` writes OpenMetrics).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Content type of the classic Prometheus text format, for clients that do not
/// ask for OpenMetrics.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Longest wait for the store probe made on each `/metrics` scrape.
const STORE_PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// What the admin endpoints report on.
#[derive(Clone)]
pub struct AdminState {
    /// The link store, probed by `/readyz`.
    pub store: Arc<dyn LinkStore>,
    /// The metrics served by `/metrics`.
    pub metrics: Arc<Metrics>,
    /// The operator link API.
    pub links: Arc<links::LinkApi>,
}

/// Answers one admin request.
pub async fn handle<B>(req: &Request<B>, state: &AdminState) -> Response<Full<Bytes>> {
    if links::is_link_path(req.uri().path()) {
        return links::handle(req, &state.links, state.store.as_ref()).await;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the admin endpoints answer GET and HEAD only",
        );
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match state.store.ready().await {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(e) => {
                tracing::warn!(error = %e, "not ready");
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "not ready: the link store is unavailable",
                )
            }
        },
        "/metrics" => {
            // One cheap probe per scrape gives alerting a `store_up` series without
            // touching the request path; bounded, so a hung database cannot make
            // the scrape itself time out.
            let up = tokio::time::timeout(STORE_PROBE_TIMEOUT, state.store.ready()).await;
            state
                .metrics
                .store_up
                .set(i64::from(matches!(up, Ok(Ok(())))));
            // Prometheus asks for OpenMetrics; anything else (curl, promtool) gets
            // the classic text format, whose counter metadata it understands.
            let openmetrics = req
                .headers()
                .get_all(header::ACCEPT)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.contains("application/openmetrics-text"));
            let encoded = state.metrics.encode();
            let (body, content_type) = if openmetrics {
                (encoded, METRICS_CONTENT_TYPE)
            } else {
                (
                    crate::telemetry::openmetrics_to_text(&encoded),
                    TEXT_CONTENT_TYPE,
                )
            };
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            resp
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "no_route",
            "the admin listener serves /healthz, /readyz and /metrics",
        ),
    }
}

/// tokenproxy's own error answer (DESIGN.md "Errors"): the `tokenproxy-error`
/// header and the JSON body, as on the proxy listener.
fn error(status: StatusCode, code: &'static str, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({
        "error": { "code": code, "message": message, "provider": null }
    });
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert("tokenproxy-error", HeaderValue::from_static(code));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
