//! Helpers shared by the integration tests: real HTTP servers that behave like
//! identity providers and upstreams, on loopback, and a store wrapper that
//! intercepts chosen calls.
#![allow(dead_code)]

pub mod child;
pub mod db;
pub mod forward;
pub mod gate;
pub mod idp;
pub mod net;
pub mod runtime;
pub mod store_wrapper;
pub mod upstream;
pub mod util;
