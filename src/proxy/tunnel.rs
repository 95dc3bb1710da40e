//! What forward mode (`HTTPS_PROXY`) carries into the pipeline: how a request
//! arrived ([`Entry`]), what a CONNECT established for the requests inside its
//! tunnel ([`Tunnel`]) and forward mode's own state ([`ForwardMode`]: the CA, the
//! unrouted-host policy, the limits tunnels inherit). It sits below both
//! `pipeline` (which serves an entry) and `connect` (which opens tunnels), so
//! neither imports the other's internals in a circle.

use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderMap;
use http::uri::Authority;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;

use super::ca::{CaError, CertAuthority};
use super::route::Route;
use super::server::{self, Limits};
use crate::config::{ConfigError, ForwardConfig, ServerConfig, Unrouted};
use crate::telemetry::Metrics;

/// How a request reached the pipeline. It decides how the caller is identified
/// and how the route is found; every later phase is shared.
pub enum Entry {
    /// Reverse mode: the path picks the route.
    Reverse,
    /// Forward mode: an absolute-form request (`GET http://host/path`) on the
    /// listener; its host picks the route.
    Absolute,
    /// Forward mode: a request inside an intercepted CONNECT tunnel.
    Tunnel(Arc<Tunnel>),
}

/// What a CONNECT established for the requests inside its tunnel.
pub struct Tunnel {
    /// The CONNECT's `Proxy-Authorization`, checked again (from the caller
    /// cache) for every request so a revoked token stops long-lived tunnels too.
    pub credentials: HeaderMap,
    /// The route of the CONNECT's host.
    pub route: Arc<Route>,
    /// `host[:port]` the client connected to; where every request goes.
    pub authority: Authority,
}

/// Forward mode's state: the CA, the unrouted-host policy and the limits
/// tunnels inherit from the listener.
pub struct ForwardMode {
    /// Mints and caches leaf certificates.
    pub ca: CertAuthority,
    pub(super) unrouted: Unrouted,
    pub(super) builder: auto::Builder<TokioExecutor>,
    pub(super) handshake_timeout: Duration,
    pub(super) connect_timeout: Duration,
    /// New leaves per caller (`forward.leaf_mint_limit`).
    pub(super) mints: super::abuse::LeafMints,
}

impl ForwardMode {
    /// Loads the CA named by `forward`.
    pub fn new(
        forward: &ForwardConfig,
        server: &ServerConfig,
        metrics: &Metrics,
    ) -> anyhow::Result<Self> {
        let ca = CertAuthority::load(
            &forward.ca_cert,
            &forward.ca_key,
            metrics.leaves_minted.clone(),
        )
        .map_err(|e| match e {
            // A CA file that is missing or wrong is a config mistake (exit 64).
            CaError::File { key, path, message } => {
                anyhow::Error::new(ConfigError::new(key, format!("{path}: {message}")))
            }
            other => other.into(),
        })?;
        let limits = Limits::from_config(server);
        Ok(Self {
            ca,
            unrouted: forward.unrouted,
            builder: server::http_builder(&limits),
            handshake_timeout: server.header_read_timeout,
            connect_timeout: server.connect_timeout,
            mints: super::abuse::LeafMints::new(forward.leaf_mint_limit, forward.leaf_mint_window),
        })
    }
}
