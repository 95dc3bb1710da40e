//! A multi-thread runtime for tests whose claim is about truly parallel callers:
//! `#[sqlx::test]` runs on a current-thread runtime, where spawned tasks only
//! interleave at await points and a race between threads can never happen.

use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

/// Runs `f` on a fresh multi-thread runtime (4 workers) with its own pool (8
/// connections) to `pool`'s database, and re-raises its panic in the caller.
/// Everything the claim is about (servers, token sources, callers) must be built
/// inside `f`, so it runs on that runtime.
pub async fn on_multi_thread<F, Fut>(pool: &PgPool, f: F)
where
    F: FnOnce(PgPool) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let opts = pool.connect_options().as_ref().clone();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let pool = PgPoolOptions::new()
                .max_connections(8)
                .connect_with(opts)
                .await
                .unwrap();
            f(pool).await
        });
    });
    let joined = tokio::task::spawn_blocking(move || thread.join())
        .await
        .unwrap();
    if let Err(panic) = joined {
        std::panic::resume_unwind(panic);
    }
}
