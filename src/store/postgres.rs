//! The Postgres backend of [`LinkStore`](super::LinkStore).
//!
//! SKELETON: implemented by the store helper.
