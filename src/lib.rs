//! tokenproxy: attaches users' OAuth2 provider credentials to requests from
//! workspaces, refreshing each access token exactly once however many callers,
//! threads and replicas want it at the same moment.
//!
//! Modules follow the request, top to bottom; nothing low imports from higher up:
//! `cli` → `app` (the wiring) → `proxy`/`admin` → `links` → `tokens` → `oauth`/`store` → `crypto`, with
//! `config`, `telemetry` and `tls` usable everywhere.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod app;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod links;
pub mod oauth;
pub mod proxy;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod tokens;
