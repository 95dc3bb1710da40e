//! `tokenproxy serve`: validates the config (already done by the caller, before any
//! port is bound), prepares the database, and runs the listeners until SIGTERM/SIGINT.
//!
//! PLACEHOLDER until the proxy lands: only the admin listener runs, answering
//! `/healthz`. The proxy engineer replaces [`run`]'s tail with a call into
//! `tokenproxy::proxy`.

use std::convert::Infallible;

use anyhow::Context;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::config::Config;
use crate::telemetry;

/// Runs the server until a shutdown signal.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    telemetry::init_tracing(cfg.logging.format);
    if cfg.encryption.keys.is_empty() {
        tracing::warn!("encryption.keys is empty: tokens are stored in plain text");
    }
    let store = super::open_store(&cfg)?;
    if cfg.database.migrate_on_start {
        store.migrate().await.context("applying migrations")?;
    }
    let admin = TcpListener::bind(cfg.server.admin_listen)
        .await
        .with_context(|| {
            format!(
                "server.admin_listen: cannot bind {}",
                cfg.server.admin_listen
            )
        })?;
    tracing::warn!(
        admin = %cfg.server.admin_listen,
        "the proxy is not built yet: serving only the admin listener (/healthz)"
    );
    serve_admin(admin, shutdown_signal()).await;
    tracing::info!("shut down");
    Ok(())
}

/// Serves `/healthz` on `listener` until `shutdown` completes.
async fn serve_admin(listener: TcpListener, shutdown: impl std::future::Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        tokio::spawn(async move {
            let service = hyper::service::service_fn(admin_response);
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn admin_response(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body) = match req.uri().path() {
        "/healthz" => (StatusCode::OK, "ok\n"),
        _ => (StatusCode::NOT_FOUND, "not found\n"),
    };
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    Ok(resp)
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
