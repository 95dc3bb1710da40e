//! `tokenproxy migrate`: applies the embedded migrations. Running it again is a no-op,
//! so deploy pipelines may run it before every rollout.

use crate::config::Config;

/// Applies pending migrations and reports success.
pub async fn run(cfg: &Config) -> anyhow::Result<()> {
    let store = super::open_store(cfg)?;
    store.migrate().await?;
    println!("migrations applied");
    Ok(())
}
