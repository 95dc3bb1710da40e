//! The proxy: listener → caller identity → route → token → inject → forward → respond.
//!
//! SKELETON: implemented by the proxy helper.
