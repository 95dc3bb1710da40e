//! Talking to identity providers: the refresh-token grant and classification of
//! its errors into permanent (`invalid_grant`) and transient.
//!
//! SKELETON: implemented by the token-source helper.
