//! The admin listener: `/healthz`, `/readyz`, `/metrics`.
//!
//! SKELETON: implemented by the proxy helper.
