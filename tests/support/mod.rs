//! Helpers shared by the integration tests: real HTTP servers that behave like
//! identity providers and upstreams, on loopback.
#![allow(dead_code)]

pub mod idp;
pub mod upstream;
