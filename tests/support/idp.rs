//! A test identity provider: single-use rotating refresh tokens, counting every grant.
