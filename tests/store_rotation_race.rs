//! `keys rotate` against a row that changes under it (PostgreSQL): the
//! rotation's compare-and-swap misses, the row keeps the concurrent write, and
//! the report counts it as `raced` so the operator knows to run it again (the
//! CLI exits non-zero on it). The conformance suite only rotates rows nobody
//! touches, where `raced` is always 0.

mod conformance;

use std::time::Duration;

use conformance::backends::Pg;
use conformance::{keyring, tokens, Backend, KEY_A, KEY_B};
use sqlx::PgPool;
use tokenproxy::config::EncryptionFormat;
use uuid::Uuid;

/// Waits (at most 10 s) until a session of this database waits for a row lock
/// with an `UPDATE` (wrapped or not in the change announcement's CTE): the rotation's swap, blocked by the test's transaction.
async fn until_an_update_waits_for_a_lock(pool: &PgPool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (waiting,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock' AND query ILIKE '%UPDATE external_auth_links%'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if waiting > 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rotation never blocked on the locked row"
        );
        // pg_stat_activity gives no event to wait for: polling, bounded above.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[sqlx::test(migrator = "tokenproxy::store::postgres::MIGRATOR")]
async fn a_row_written_during_rotation_is_left_alone_and_counted_as_raced(pool: PgPool) {
    let b = Pg(pool.clone());
    let old = b.store(keyring(EncryptionFormat::Coder, &[KEY_A])).await;
    let (raced_user, quiet_user) = (Uuid::new_v4(), Uuid::new_v4());
    for u in [raced_user, quiet_user] {
        old.put_link("github", u, &tokens("a0", "r0"))
            .await
            .unwrap();
    }
    let rotator = b
        .store(keyring(EncryptionFormat::Native, &[KEY_B, KEY_A]))
        .await;

    // Lock one row, let the rotation read it and block on its swap, then change
    // the row's access token (a login or refresh elsewhere) and commit: the
    // swap's re-checked condition no longer holds.
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM external_auth_links WHERE user_id = $1 FOR UPDATE")
        .bind(raced_user)
        .execute(&mut *tx)
        .await
        .unwrap();
    let rotation = tokio::spawn({
        let rotator = rotator.clone();
        async move { rotator.rotate_keys().await }
    });
    until_an_update_waits_for_a_lock(&pool).await;
    sqlx::query(
        "UPDATE external_auth_links SET oauth_access_token = 'written-meanwhile', \
         oauth_access_token_key_id = NULL WHERE user_id = $1",
    )
    .bind(raced_user)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();

    let report = rotation.await.unwrap().unwrap();
    assert_eq!(
        (report.rotated, report.raced, report.unchanged),
        (1, 1, 0),
        "the quiet row rotated, the changed one raced"
    );
    let raw = b.raw_tokens("github", raced_user).await;
    assert_eq!(raw.access, "written-meanwhile", "the rotation kept off it");

    // Run again, as the CLI says: now the row rotates.
    let again = rotator.rotate_keys().await.unwrap();
    assert_eq!((again.rotated, again.raced, again.unchanged), (1, 0, 1));
}
