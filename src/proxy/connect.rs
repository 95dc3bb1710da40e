//! Forward mode's CONNECT: who may open a tunnel, to where, and what happens
//! inside it.
//!
//! A CONNECT to a routed host is intercepted: tokenproxy answers 200, terminates
//! the client's TLS with a leaf its CA minted for that host, and serves every
//! request inside through the same pipeline phases as reverse mode
//! ([`Entry::Tunnel`]), so the credential is attached exactly as it would be for
//! a reverse-mode request and the upstream is reached over a fresh, verified TLS
//! connection. A CONNECT to any other host is refused (`deny`) or relayed byte
//! for byte without interception (`tunnel`). Either way the caller must identify
//! itself first: a missing or bad `Proxy-Authorization` gets a 407 on a
//! connection that stays open for the retry (git's first CONNECT carries no
//! credentials).

use std::convert::Infallible;
use std::sync::Arc;

use http::header::{self, HeaderMap};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::error::ProxyError;
use super::pipeline::{authorize, upstream_authority, Outcome, Pipeline};
use super::server::{ConnContext, ConnInfo};
use super::tunnel::{Entry, Tunnel};
use super::ProxyBody;
use crate::config::Unrouted;

/// What a CONNECT was answered with, before its tunnel starts.
enum Opened {
    Intercept(Arc<Tunnel>, String),
    Relay(TcpStream),
}

/// Answers a CONNECT on the listener, starting its tunnel when the answer is 200.
pub async fn handle(
    pipeline: Arc<Pipeline>,
    mut req: Request<Incoming>,
    conn: ConnInfo,
) -> Response<ProxyBody> {
    let start = Instant::now();
    let mut outcome = Outcome::new();
    let resp = match open(&pipeline, &req, conn, &mut outcome).await {
        Ok(opened) => {
            let upgrade = hyper::upgrade::on(&mut req);
            let context = req.extensions().get::<ConnContext>().cloned();
            let pipeline = pipeline.clone();
            tokio::spawn(async move {
                match upgrade.await {
                    Ok(upgraded) => {
                        let io = TokioIo::new(upgraded);
                        match opened {
                            Opened::Intercept(tunnel, host) => {
                                intercept(pipeline, io, tunnel, host, conn, context).await;
                            }
                            Opened::Relay(upstream) => relay(io, upstream, context).await,
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
                }
            });
            let mut resp =
                Response::new(Empty::new().map_err(|never| match never {}).boxed_unsync());
            *resp.status_mut() = StatusCode::OK;
            resp
        }
        Err(e) => pipeline.error_response(&e, &outcome),
    };
    pipeline.log_and_count(&Method::CONNECT, &resp, &outcome, start.elapsed());
    resp
}

/// Decides a CONNECT: identify the caller, then intercept a routed host, or
/// deny or relay an unrouted one.
async fn open(
    pipeline: &Pipeline,
    req: &Request<Incoming>,
    conn: ConnInfo,
    outcome: &mut Outcome,
) -> Result<Opened, ProxyError> {
    let forward = pipeline.forward.as_ref().ok_or(ProxyError::BadRequest(
        "CONNECT is not supported on this listener",
    ))?;
    let (host, port) = connect_target(req.uri())?;
    let caller = pipeline.identify_caller(req.headers(), conn, true).await?;
    outcome.user = Some(caller.user_id);
    let Some(route) = pipeline.router.find_host(&host, port, 443) else {
        return match forward.unrouted {
            Unrouted::Deny => Err(ProxyError::HostNotAllowed),
            Unrouted::Tunnel => {
                let target = (host.as_str(), port);
                let stream =
                    tokio::time::timeout(forward.connect_timeout, TcpStream::connect(target))
                        .await
                        .map_err(|_| ProxyError::UpstreamTimeout)?
                        .map_err(|_| ProxyError::UpstreamUnavailable)?;
                let _ = stream.set_nodelay(true);
                Ok(Opened::Relay(stream))
            }
        };
    };
    outcome.route = Some(route.clone());
    authorize(&caller, route)?;
    // A wildcard route names unboundedly many hosts, each a leaf to mint (an
    // RSA/ECDSA key and a signature): the caller's rate of new ones is bounded.
    if !forward.ca.has_leaf(&host) {
        forward.mints.mint(caller.user_id)?;
    }
    // Once per host per replica (a CONNECT, not every request inside it).
    pipeline
        .metrics
        .audit
        .host_intercepted(&host, caller.user_id);
    let tunnel = Tunnel {
        credentials: proxy_credentials(req.headers()),
        route: route.clone(),
        // The normalised host: no trailing dot in SNI or Host upstream.
        authority: upstream_authority(&host, port, 443)?,
    };
    Ok(Opened::Intercept(Arc::new(tunnel), host))
}

/// The host (lowercase, without IPv6 brackets or a trailing dot) and port of a
/// CONNECT's authority-form target; a pure function, fuzzed in `tests/fuzz.rs`.
pub fn connect_target(uri: &http::Uri) -> Result<(String, u16), ProxyError> {
    let authority = uri
        .authority()
        .ok_or(ProxyError::BadRequest("CONNECT needs host:port"))?;
    let port = authority
        .port_u16()
        .ok_or(ProxyError::BadRequest("CONNECT needs host:port"))?;
    if port == 0 {
        return Err(ProxyError::BadRequest("CONNECT port 0 names no server"));
    }
    if authority.as_str().contains('@') {
        return Err(ProxyError::BadRequest(
            "CONNECT target must not carry userinfo",
        ));
    }
    let raw = authority.host();
    // Brackets only enclose an IPv6 literal: `&[]:1` (found by tests/fuzz.rs)
    // parses as a URI authority, and trimming its `]` left the host `&[`.
    let inner = raw.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
    let bracketed = inner.is_some();
    let host = inner
        .unwrap_or(raw)
        .trim_end_matches('.')
        .to_ascii_lowercase();
    // A bracketed host must be an IPv6 literal; an empty or over-long name is no
    // host at all (DNS names end at 253 characters).
    if host.is_empty()
        || host.len() > 253
        || host.contains(['[', ']'])
        || (bracketed && host.parse::<std::net::Ipv6Addr>().is_err())
    {
        return Err(ProxyError::BadRequest("CONNECT needs host:port"));
    }
    Ok((host, port))
}

/// The CONNECT's `Proxy-Authorization`, kept (marked sensitive) for the tunnel.
fn proxy_credentials(headers: &HeaderMap) -> HeaderMap {
    let mut kept = HeaderMap::new();
    for v in headers.get_all(header::PROXY_AUTHORIZATION) {
        let mut v = v.clone();
        v.set_sensitive(true);
        kept.append(header::PROXY_AUTHORIZATION, v);
    }
    kept
}

/// Terminates the client's TLS with a leaf for `host` and serves the requests
/// inside through the pipeline until the client is done or shutdown drains it.
async fn intercept(
    pipeline: Arc<Pipeline>,
    io: TokioIo<hyper::upgrade::Upgraded>,
    tunnel: Arc<Tunnel>,
    host: String,
    conn: ConnInfo,
    context: Option<ConnContext>,
) {
    let remote = conn.remote;
    let Some(forward) = pipeline.forward.as_ref() else {
        return;
    };
    let timeout = forward.handshake_timeout;
    let acceptor = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io);
    let Ok(Ok(start)) = tokio::time::timeout(timeout, acceptor).await else {
        tracing::debug!(%remote, "no TLS ClientHello in the tunnel");
        return;
    };
    // The leaf is for the CONNECT's host; a client naming another one is confused
    // or probing, and gets nothing.
    if let Some(sni) = start.client_hello().server_name() {
        if !sni.trim_end_matches('.').eq_ignore_ascii_case(&host) {
            tracing::debug!(%remote, "TLS server name differs from the CONNECT host");
            return;
        }
    }
    let config = match forward.ca.server_config(&host).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "could not mint a leaf certificate");
            return;
        }
    };
    let Ok(Ok(tls)) = tokio::time::timeout(timeout, start.into_stream(config)).await else {
        tracing::debug!(%remote, "TLS handshake in the tunnel failed");
        return;
    };
    let info = ConnInfo { tls: true, ..conn };
    let builder = forward.builder.clone();
    let handler = pipeline.clone();
    let service = hyper::service::service_fn(move |req| {
        let pipeline = handler.clone();
        let entry = Entry::Tunnel(tunnel.clone());
        async move { Ok::<_, Infallible>(pipeline.handle_entry(req, info, &entry).await) }
    });
    let conn = builder.serve_connection(TokioIo::new(tls), service);
    tokio::pin!(conn);
    let Some(context) = context else {
        let _ = conn.await;
        return;
    };
    let mut shutdown = context.shutdown.clone();
    tokio::select! {
        _ = conn.as_mut() => return,
        () = shutdown.fired() => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(context.grace, conn).await;
}

/// Relays bytes both ways between the client and an unrouted host until either
/// side closes, or the grace period after shutdown ends.
async fn relay(
    mut client: TokioIo<hyper::upgrade::Upgraded>,
    mut upstream: TcpStream,
    context: Option<ConnContext>,
) {
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    match context {
        Some(context) => {
            let mut shutdown = context.shutdown.clone();
            let cut_off = async move {
                shutdown.fired().await;
                tokio::time::sleep(context.grace).await;
            };
            tokio::select! {
                _ = copy => {}
                () = cut_off => {}
            }
        }
        None => {
            let _ = copy.await;
        }
    }
}
