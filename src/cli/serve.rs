//! `tokenproxy serve`: validates the config (already done by the caller, before any
//! port is bound), then hands off to [`crate::app::serve`], which prepares the
//! database, starts the token source and runs both listeners until SIGTERM/SIGINT.

use crate::config::Config;
use crate::telemetry;

/// Runs the server until a shutdown signal.
pub async fn run(mut cfg: Config) -> anyhow::Result<()> {
    // Held to the end, whichever way `serve` ends: dropping it writes out the
    // buffered log, so `shut down` and the lines before an error exit are kept.
    let _log = telemetry::init_logging(&cfg.logging, true)?;
    // OIDC endpoints come from the issuer; refuse to start without them.
    crate::oauth::presets::discover(&mut cfg).await?;
    if cfg.providers.iter().all(|p| p.routes.is_empty()) {
        tracing::warn!(
            "no [[providers]] with routes configured: every request will answer no_route"
        );
    }
    if cfg.encryption.keys.is_empty() {
        tracing::warn!("encryption.keys is empty: tokens are stored in plain text");
    }
    crate::app::serve(cfg).await?;
    tracing::info!("shut down");
    Ok(())
}
