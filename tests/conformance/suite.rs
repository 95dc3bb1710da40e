//! The suite itself: one async fn per behaviour, each taking a [`Backend`].

use std::sync::Arc;
use std::time::Duration;

use secrecy::ExposeSecret;
use tokenproxy::config::EncryptionFormat;
use tokenproxy::crypto::Keyring;
use tokenproxy::store::{ChangeEvent, LeaseClaim, LinkStore, NewProxyToken, StoreError};
use uuid::Uuid;

use super::{fence, keyring, put_and_read, stored, tokens, Backend, KEY_A, KEY_B};

/// `migrate` on an empty database makes it ready; running it again changes nothing.
pub async fn migrations_apply_twice(b: &dyn Backend) {
    let store = b.store(Keyring::plaintext()).await;
    assert!(store.ready().await.is_err(), "not ready before migrating");
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();
    store.ready().await.unwrap();
    // A second replica migrating the migrated database is a no-op too.
    b.store(Keyring::plaintext()).await.migrate().await.unwrap();
}

/// Plain-text round trip, listing and deletion.
pub async fn put_get_list_delete(b: &dyn Backend) {
    let store = b.store(Keyring::plaintext()).await;
    let user = Uuid::new_v4();
    store
        .put_link("github", user, &tokens("at1", "rt1"))
        .await
        .unwrap();
    let link = store.get_link("github", user).await.unwrap().unwrap();
    assert_eq!(link.provider_id, "github");
    assert_eq!(link.user_id, user);
    assert_eq!(link.access_token.expose_secret(), "at1");
    assert_eq!(link.refresh_token.expose_secret(), "rt1");
    assert_eq!(link.refresh_token_stored.0, "rt1");
    assert_eq!(link.expiry, tokens("", "").expiry);
    assert_eq!(link.extra, Some(serde_json::json!({"scope": "repo"})));
    assert_eq!(link.refresh_failure_reason, "");
    assert_eq!(link.lease_expires_at, None);
    assert!(store.get_link("gitlab", user).await.unwrap().is_none());

    // Replacing keeps created_at; "never expires" and no extra survive the trip.
    let mut never = tokens("at2", "");
    never.expiry = None;
    never.extra = None;
    store.put_link("github", user, &never).await.unwrap();
    let again = store.get_link("github", user).await.unwrap().unwrap();
    assert_eq!(again.access_token.expose_secret(), "at2");
    assert_eq!(again.refresh_token.expose_secret(), "");
    assert_eq!(again.expiry, None);
    assert_eq!(again.extra, None);
    assert_eq!(again.created_at, link.created_at);
    assert!(again.updated_at >= link.updated_at);

    let other = Uuid::new_v4();
    store
        .put_link("gitlab", other, &tokens("a", "r"))
        .await
        .unwrap();
    let all = store.list_links(None).await.unwrap();
    assert_eq!(all.len(), 2);
    let mine = store.list_links(Some(user)).await.unwrap();
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0].provider_id, "github");
    assert!(!mine[0].has_refresh_token && !mine[0].encrypted);
    assert_eq!(mine[0].expiry, None);

    // Expiry keeps its microseconds.
    let mut precise = tokens("at3", "rt3");
    let at = chrono::Utc::now() + chrono::Duration::hours(8);
    let at = chrono::DateTime::from_timestamp_micros(at.timestamp_micros()).unwrap();
    precise.expiry = Some(at);
    store.put_link("github", user, &precise).await.unwrap();
    let link = store.get_link("github", user).await.unwrap().unwrap();
    assert_eq!(link.expiry, Some(at));

    assert!(store.delete_link("github", user).await.unwrap());
    assert!(!store.delete_link("github", user).await.unwrap());
    assert!(store.get_link("github", user).await.unwrap().is_none());
    assert_eq!(store.list_links(None).await.unwrap().len(), 1);
}

/// With a key, neither token column holds the plaintext, in either format.
pub async fn encrypted_columns_never_hold_plaintext(b: &dyn Backend) {
    for format in [EncryptionFormat::Coder, EncryptionFormat::Native] {
        let kr = keyring(format, &[KEY_A]);
        let key_id = kr.primary_key_id().map(str::to_owned);
        let store = b.store(kr).await;
        let user = Uuid::new_v4();
        store
            .put_link("github", user, &tokens("secret-access", "secret-refresh"))
            .await
            .unwrap();
        let raw = b.raw_tokens("github", user).await;
        assert!(!raw.access.contains("secret") && !raw.refresh.contains("secret"));
        assert_eq!(raw.access_key_id, key_id);
        assert_eq!(raw.refresh_key_id, key_id);
        let link = store.get_link("github", user).await.unwrap().unwrap();
        assert_eq!(link.access_token.expose_secret(), "secret-access");
        assert_eq!(link.refresh_token.expose_secret(), "secret-refresh");
        assert_eq!(link.refresh_token_stored.0, raw.refresh);
        let listed = store.list_links(Some(user)).await.unwrap();
        assert!(listed[0].encrypted && listed[0].has_refresh_token);
    }
}

/// A value under a key the keyring lacks is a decrypt error, never garbage;
/// listings still work.
pub async fn unknown_key_is_a_decrypt_error(b: &dyn Backend) {
    let user = Uuid::new_v4();
    b.store(keyring(EncryptionFormat::Native, &[KEY_A]))
        .await
        .put_link("github", user, &tokens("a0", "r0"))
        .await
        .unwrap();
    let other = b.store(keyring(EncryptionFormat::Native, &[KEY_B])).await;
    match other.get_link("github", user).await {
        Err(StoreError::Decrypt {
            provider_id,
            user_id,
            ..
        }) => assert_eq!((provider_id.as_str(), user_id), ("github", user)),
        other => panic!("expected a decrypt error, got {other:?}"),
    }
    let listed = other.list_links(Some(user)).await.unwrap();
    assert!(listed[0].encrypted && listed[0].has_refresh_token);
}

/// Two replicas write a refresh against the same old token: exactly one applies.
pub async fn concurrent_refresh_writes_exactly_one_applies(b: &dyn Backend) {
    for format in [EncryptionFormat::Native, EncryptionFormat::Coder] {
        let a = b.store(keyring(format, &[KEY_A])).await;
        let c = b.store(keyring(format, &[KEY_A])).await;
        for _ in 0..10 {
            let user = Uuid::new_v4();
            a.put_link("github", user, &tokens("a0", "r0"))
                .await
                .unwrap();
            let old = a.get_link("github", user).await.unwrap().unwrap();
            let (t1, t2) = (tokens("a1", "r1"), tokens("a2", "r2"));
            let old = &old.fence();
            let (ra, rc) = tokio::join!(
                a.write_refreshed("github", user, old, &t1),
                c.write_refreshed("github", user, old, &t2),
            );
            let (ra, rc) = (ra.unwrap(), rc.unwrap());
            assert!(ra ^ rc, "exactly one write applies (got {ra}, {rc})");
            let now = a.get_link("github", user).await.unwrap().unwrap();
            let want = if ra { "r1" } else { "r2" };
            assert_eq!(now.refresh_token.expose_secret(), want);
        }
    }
}

/// A failure record against a token that was already replaced applies nothing.
pub async fn failure_record_against_changed_token_applies_nothing(b: &dyn Backend) {
    let store = b.store(keyring(EncryptionFormat::Native, &[KEY_A])).await;
    let user = Uuid::new_v4();
    let old = put_and_read(store.as_ref(), user).await;
    let old_stored = &old.fence();
    assert!(store
        .write_refreshed("github", user, old_stored, &tokens("a1", "r1"))
        .await
        .unwrap());
    assert!(!store
        .record_refresh_failure("github", user, old_stored, None, "invalid_grant")
        .await
        .unwrap());
    let now = store.get_link("github", user).await.unwrap().unwrap();
    assert_eq!(now.refresh_failure_reason, "");
    assert_eq!(now.refresh_token.expose_secret(), "r1");
    // Against the current token it applies, and a put clears it.
    assert!(store
        .record_refresh_failure("github", user, &now.fence(), None, "invalid_grant")
        .await
        .unwrap());
    let failed = store.get_link("github", user).await.unwrap().unwrap();
    assert_eq!(failed.refresh_failure_reason, "invalid_grant");
    store
        .put_link("github", user, &tokens("a2", "r2"))
        .await
        .unwrap();
    let relinked = store.get_link("github", user).await.unwrap().unwrap();
    assert_eq!(relinked.refresh_failure_reason, "");
    // A lost link is reported as not applied, not as an error.
    assert!(!store
        .write_refreshed(
            "github",
            Uuid::new_v4(),
            &fence("x", "y"),
            &tokens("a", "r")
        )
        .await
        .unwrap());
}

async fn claim(
    store: &dyn LinkStore,
    user: Uuid,
    old: &tokenproxy::store::StoredSecret,
) -> LeaseClaim {
    store
        .claim_refresh_lease("github", user, old, Duration::from_secs(30))
        .await
        .unwrap()
}

/// Lease: acquired, held, changed, taken over after expiry, fenced, released.
pub async fn lease_claim_held_changed_and_expiry(b: &dyn Backend) {
    let store = b.store(keyring(EncryptionFormat::Native, &[KEY_A])).await;
    let store = store.as_ref();
    let user = Uuid::new_v4();
    let old = put_and_read(store, user).await;
    let old_stored = &old.refresh_token_stored;
    let old_fence = &old.fence();

    let LeaseClaim::Acquired(first) = claim(store, user, old_stored).await else {
        panic!("first claim must acquire")
    };
    match claim(store, user, old_stored).await {
        LeaseClaim::Held { until } => assert_eq!(until, first.expires_at),
        other => panic!("expected Held, got {other:?}"),
    }
    let row = store.get_link("github", user).await.unwrap().unwrap();
    assert_eq!(row.lease_expires_at, Some(first.expires_at));
    assert!(matches!(
        claim(store, user, &stored("not-it")).await,
        LeaseClaim::Changed
    ));
    assert!(matches!(
        store
            .claim_refresh_lease("gitlab", user, old_stored, Duration::from_secs(30))
            .await
            .unwrap(),
        LeaseClaim::Changed
    ));

    // The holder crashes; its lease runs out (database clock, no sleeping).
    b.expire_lease("github", user).await;
    let LeaseClaim::Acquired(second) = claim(store, user, old_stored).await else {
        panic!("an expired lease can be claimed")
    };
    assert_ne!(second.expires_at, first.expires_at);

    // The old holder is fenced off: its failure record and release do nothing.
    assert!(!store
        .record_refresh_failure("github", user, old_fence, Some(&first), "invalid_grant")
        .await
        .unwrap());
    store.release_refresh_lease(&first).await.unwrap();
    let row = store.get_link("github", user).await.unwrap().unwrap();
    assert_eq!(row.lease_expires_at, Some(second.expires_at));
    assert_eq!(row.refresh_failure_reason, "");

    // The current holder's failure record applies and releases the lease.
    assert!(store
        .record_refresh_failure("github", user, old_fence, Some(&second), "invalid_grant")
        .await
        .unwrap());
    let row = store.get_link("github", user).await.unwrap().unwrap();
    assert_eq!(row.lease_expires_at, None);
    assert_eq!(row.refresh_failure_reason, "invalid_grant");

    // Release of a held lease frees it; a successful refresh write clears it.
    let LeaseClaim::Acquired(third) = claim(store, user, old_stored).await else {
        panic!("released lease can be claimed")
    };
    store.release_refresh_lease(&third).await.unwrap();
    let LeaseClaim::Acquired(_fourth) = claim(store, user, old_stored).await else {
        panic!("released lease can be claimed again")
    };
    assert!(store
        .write_refreshed("github", user, old_fence, &tokens("a1", "r1"))
        .await
        .unwrap());
    let row = store.get_link("github", user).await.unwrap().unwrap();
    assert_eq!(row.lease_expires_at, None);
    assert_eq!(row.refresh_failure_reason, "");
}

/// Many replicas claim one lease at the same moment: exactly one acquires.
pub async fn concurrent_lease_claims_exactly_one_acquires(b: &dyn Backend) {
    let mut stores: Vec<Arc<dyn LinkStore>> = Vec::new();
    for _ in 0..4 {
        stores.push(b.store(keyring(EncryptionFormat::Native, &[KEY_A])).await);
    }
    for _ in 0..5 {
        let user = Uuid::new_v4();
        let old = put_and_read(stores[0].as_ref(), user).await;
        let claims = stores.iter().flat_map(|s| {
            let old = old.refresh_token_stored.clone();
            (0..5).map(move |_| {
                let s = s.clone();
                let old = old.clone();
                tokio::spawn(async move { claim(s.as_ref(), user, &old).await })
            })
        });
        let claims: Vec<_> = claims.collect();
        let mut acquired = Vec::new();
        let mut held = 0;
        for c in claims {
            match c.await.unwrap() {
                LeaseClaim::Acquired(l) => acquired.push(l),
                LeaseClaim::Held { .. } => held += 1,
                LeaseClaim::Changed => panic!("the token did not change"),
            }
        }
        assert_eq!(acquired.len(), 1, "exactly one claim acquires");
        assert_eq!(held, 19);
        match claim(stores[1].as_ref(), user, &old.refresh_token_stored).await {
            LeaseClaim::Held { until } => assert_eq!(until, acquired[0].expires_at),
            other => panic!("expected Held, got {other:?}"),
        }
    }
}

/// `rotate_keys` re-encrypts every row (plain ones too) and keeps failure reasons.
pub async fn rotation_reencrypts_everything_and_keeps_failure_reasons(b: &dyn Backend) {
    let old = b.store(keyring(EncryptionFormat::Coder, &[KEY_A])).await;
    let users: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    for (i, u) in users.iter().enumerate() {
        old.put_link("github", *u, &tokens(&format!("a{i}"), &format!("r{i}")))
            .await
            .unwrap();
    }
    // One plain-text row from before encryption was turned on.
    let plain_user = Uuid::new_v4();
    b.insert_plain("github", plain_user, "plain-a", "plain-r")
        .await;
    let failed = old.get_link("github", users[0]).await.unwrap().unwrap();
    assert!(old
        .record_refresh_failure("github", users[0], &failed.fence(), None, "bad")
        .await
        .unwrap());

    // New first key, native format; the old key still decrypts.
    let rotating = b
        .store(keyring(EncryptionFormat::Native, &[KEY_B, KEY_A]))
        .await;
    let report = rotating.rotate_keys().await.unwrap();
    assert_eq!(report.rotated, 6);
    assert_eq!(report.raced, 0);
    assert_eq!(rotating.rotate_keys().await.unwrap().unchanged, 6);

    let new_kr = keyring(EncryptionFormat::Native, &[KEY_B]);
    let new_id = new_kr.primary_key_id().map(str::to_owned);
    let new_only = b.store(new_kr).await;
    for (i, u) in users.iter().enumerate() {
        let link = new_only.get_link("github", *u).await.unwrap().unwrap();
        assert_eq!(link.access_token.expose_secret(), format!("a{i}"));
        assert_eq!(link.refresh_token.expose_secret(), format!("r{i}"));
    }
    let plain = new_only
        .get_link("github", plain_user)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(plain.refresh_token.expose_secret(), "plain-r");
    let still_failed = new_only
        .get_link("github", users[0])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(still_failed.refresh_failure_reason, "bad");
    for u in users.iter().chain([&plain_user]) {
        let raw = b.raw_tokens("github", *u).await;
        assert!(!raw.access.contains("plain") && !raw.refresh.contains("plain"));
        assert_eq!(raw.access_key_id, new_id);
        assert_eq!(raw.refresh_key_id, new_id);
    }
}

/// A refresh write (or failure record) that races a rotation still lands.
pub async fn refresh_write_racing_rotation_is_never_lost(b: &dyn Backend) {
    // A replica that has not switched yet: writes with the old key, knows both.
    let refresher = b
        .store(keyring(EncryptionFormat::Coder, &[KEY_A, KEY_B]))
        .await;
    let rotator = b
        .store(keyring(EncryptionFormat::Native, &[KEY_B, KEY_A]))
        .await;
    // Deterministic interleaving: the refresher reads, rotation re-encrypts the
    // row, then the refresher writes against the value it read.
    let user = Uuid::new_v4();
    refresher
        .put_link("github", user, &tokens("a0", "r0"))
        .await
        .unwrap();
    let read = refresher.get_link("github", user).await.unwrap().unwrap();
    assert_eq!(rotator.rotate_keys().await.unwrap().rotated, 1);
    assert!(refresher
        .write_refreshed("github", user, &read.fence(), &tokens("a1", "r1"))
        .await
        .unwrap());
    let now = rotator.get_link("github", user).await.unwrap().unwrap();
    assert_eq!(now.refresh_token.expose_secret(), "r1");

    // Likewise a failure record against a token that was only re-encrypted.
    assert_eq!(rotator.rotate_keys().await.unwrap().rotated, 1);
    assert!(refresher
        .record_refresh_failure("github", user, &now.fence(), None, "revoked")
        .await
        .unwrap());
    let now = rotator.get_link("github", user).await.unwrap().unwrap();
    assert_eq!(now.refresh_failure_reason, "revoked");

    // Truly concurrent: many refreshes while rotations run; every one lands.
    let users: Vec<Uuid> = (0..20).map(|_| Uuid::new_v4()).collect();
    for u in &users {
        refresher
            .put_link("github", *u, &tokens("a0", "r0"))
            .await
            .unwrap();
    }
    let mut reads = Vec::new();
    for u in &users {
        reads.push(refresher.get_link("github", *u).await.unwrap().unwrap());
    }
    let writes = async {
        let mut applied = 0;
        for (u, read) in users.iter().zip(&reads) {
            let ok = refresher
                .write_refreshed("github", *u, &read.fence(), &tokens("a1", "r1"))
                .await
                .unwrap();
            applied += usize::from(ok);
        }
        applied
    };
    let rotations = async {
        for _ in 0..3 {
            rotator.rotate_keys().await.unwrap();
        }
    };
    let (applied, ()) = tokio::join!(writes, rotations);
    assert_eq!(applied, users.len());
    for u in &users {
        let link = rotator.get_link("github", *u).await.unwrap().unwrap();
        assert_eq!(link.refresh_token.expose_secret(), "r1");
    }
}

/// Proxy tokens: create, find by hash, refuse a duplicate, touch, list, revoke.
pub async fn proxy_tokens_create_find_list_revoke_touch(b: &dyn Backend) {
    let store = b.store(Keyring::plaintext()).await;
    let user = Uuid::new_v4();
    let hash = [7u8; 32];
    let expires = chrono::Utc::now() + chrono::Duration::days(30);
    let created = store
        .create_proxy_token(&NewProxyToken {
            user_id: user,
            name: "laptop".into(),
            hash,
            providers: vec!["github".into(), "gitlab".into()],
            expires_at: Some(expires),
        })
        .await
        .unwrap();
    assert_eq!(created.user_id, user);
    assert_eq!(created.name, "laptop");
    assert_eq!(
        created.providers,
        vec!["github".to_owned(), "gitlab".into()]
    );
    // Stored to the microsecond.
    let micros = |t: chrono::DateTime<chrono::Utc>| t.timestamp_micros();
    assert_eq!(created.expires_at.map(micros), Some(micros(expires)));
    assert!(created.last_used_at.is_none() && created.revoked_at.is_none());
    let found = store.find_proxy_token(&hash).await.unwrap().unwrap();
    assert_eq!(found.id, created.id);
    assert_eq!(found.providers, created.providers);
    assert!(store.find_proxy_token(&[8u8; 32]).await.unwrap().is_none());
    // The same hash twice is refused.
    let dup = store
        .create_proxy_token(&NewProxyToken {
            user_id: user,
            name: "again".into(),
            hash,
            providers: vec![],
            expires_at: None,
        })
        .await;
    assert!(matches!(dup, Err(StoreError::Other(_))), "{dup:?}");
    let other = store
        .create_proxy_token(&NewProxyToken {
            user_id: Uuid::new_v4(),
            name: String::new(),
            hash: [9u8; 32],
            providers: vec![],
            expires_at: None,
        })
        .await
        .unwrap();
    assert!(other.providers.is_empty() && other.expires_at.is_none());

    store.touch_proxy_token(created.id).await.unwrap();
    assert!(store
        .find_proxy_token(&hash)
        .await
        .unwrap()
        .unwrap()
        .last_used_at
        .is_some());
    assert_eq!(store.list_proxy_tokens(Some(user)).await.unwrap().len(), 1);
    assert_eq!(
        store
            .list_proxy_tokens(Some(Uuid::new_v4()))
            .await
            .unwrap()
            .len(),
        0
    );
    assert_eq!(store.list_proxy_tokens(None).await.unwrap().len(), 2);
    assert!(store.revoke_proxy_token(created.id).await.unwrap());
    assert!(!store.revoke_proxy_token(created.id).await.unwrap());
    assert!(!store.revoke_proxy_token(Uuid::new_v4()).await.unwrap());
    let revoked = store.find_proxy_token(&hash).await.unwrap().unwrap();
    assert!(revoked.revoked_at.is_some());
}

/// The next change event, within a bound so a broken feed fails instead of hanging.
pub async fn next_event(rx: &mut tokio::sync::mpsc::Receiver<ChangeEvent>) -> ChangeEvent {
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("change event within the bound")
        .expect("feed open")
}

/// Every change that applied reaches another replica's feed, in order; writes
/// that did not apply, and lease claims, announce nothing.
pub async fn change_feed_announces_every_applied_change(b: &dyn Backend) {
    let watcher = b.store(Keyring::plaintext()).await;
    let store = b.store(keyring(EncryptionFormat::Native, &[KEY_A])).await;
    let mut rx = watcher.watch_changes().await.unwrap();
    assert_eq!(next_event(&mut rx).await, ChangeEvent::Resync);
    let user = Uuid::new_v4();
    let ev = |p: &str| ChangeEvent::Link {
        provider_id: p.to_owned(),
        user_id: user,
    };

    store
        .put_link("github", user, &tokens("a0", "r0"))
        .await
        .unwrap();
    assert_eq!(next_event(&mut rx).await, ev("github"));
    let read = store.get_link("github", user).await.unwrap().unwrap();
    let old = &read.fence();
    assert!(store
        .write_refreshed("github", user, old, &tokens("a1", "r1"))
        .await
        .unwrap());
    assert_eq!(next_event(&mut rx).await, ev("github"));
    // Neither a lost compare-and-swap nor a lease claim is announced: the next
    // event is gitlab's.
    assert!(!store
        .write_refreshed("github", user, old, &tokens("a2", "r2"))
        .await
        .unwrap());
    let now = store.get_link("github", user).await.unwrap().unwrap();
    let LeaseClaim::Acquired(lease) = claim(store.as_ref(), user, &now.refresh_token_stored).await
    else {
        panic!("claim must acquire")
    };
    store
        .put_link("gitlab", user, &tokens("a0", "r0"))
        .await
        .unwrap();
    assert_eq!(next_event(&mut rx).await, ev("gitlab"));
    // A release is, so waiters re-read at once; so is a failure record.
    store.release_refresh_lease(&lease).await.unwrap();
    assert_eq!(next_event(&mut rx).await, ev("github"));
    assert!(store
        .record_refresh_failure("github", user, &now.fence(), None, "bad")
        .await
        .unwrap());
    assert_eq!(next_event(&mut rx).await, ev("github"));
    assert!(store.delete_link("github", user).await.unwrap());
    assert_eq!(next_event(&mut rx).await, ev("github"));
    // Deleting what is not there announces nothing.
    assert!(!store.delete_link("github", user).await.unwrap());
    assert!(store.delete_link("gitlab", user).await.unwrap());
    assert_eq!(next_event(&mut rx).await, ev("gitlab"));
}

/// A provider that does not rotate refresh tokens: a stale writer (it read the
/// row before a newer refresh landed) must not overwrite the newer access
/// token, nor record a failure over it — with encryption on, where every write
/// re-encrypts the unchanged refresh token, and off, where it is unchanged
/// byte for byte. A re-encryption alone (`keys rotate`) does not fence a write.
pub async fn non_rotating_stale_writer_is_fenced(b: &dyn Backend) {
    let keyed = [
        Keyring::plaintext(),
        keyring(EncryptionFormat::Native, &[KEY_A]),
        keyring(EncryptionFormat::Coder, &[KEY_A]),
    ];
    for (i, kr) in keyed.into_iter().enumerate() {
        let encrypted = i > 0;
        let store = b.store(kr).await;
        let user = Uuid::new_v4();
        store
            .put_link("github", user, &tokens("a0", "r0"))
            .await
            .unwrap();
        let stale = store.get_link("github", user).await.unwrap().unwrap();
        let fresh = store.get_link("github", user).await.unwrap().unwrap();

        // The newer refresh lands first; the provider kept r0.
        assert!(store
            .write_refreshed("github", user, &fresh.fence(), &tokens("b1", "r0"))
            .await
            .unwrap());
        // The stale writer's older access token must not replace it ...
        assert!(
            !store
                .write_refreshed("github", user, &stale.fence(), &tokens("a1", "r0"))
                .await
                .unwrap(),
            "stale write applied (case {i})"
        );
        // ... nor may it mark the link broken.
        assert!(!store
            .record_refresh_failure("github", user, &stale.fence(), None, "invalid_grant")
            .await
            .unwrap());
        let now = store.get_link("github", user).await.unwrap().unwrap();
        assert_eq!(now.access_token.expose_secret(), "b1", "case {i}");
        assert_eq!(now.refresh_token.expose_secret(), "r0");
        assert_eq!(now.refresh_failure_reason, "");

        // A stale writer whose answer rotated the refresh token still lands: the
        // provider may have retired r0, and the row still holds the one exchanged.
        assert!(store
            .write_refreshed("github", user, &stale.fence(), &tokens("a2", "r2"))
            .await
            .unwrap());
        let now = store.get_link("github", user).await.unwrap().unwrap();
        assert_eq!(now.refresh_token.expose_secret(), "r2");

        if encrypted {
            // Only re-encrypted since the read: the write applies.
            let rotator = b
                .store(keyring(EncryptionFormat::Native, &[KEY_B, KEY_A]))
                .await;
            let read = rotator.get_link("github", user).await.unwrap().unwrap();
            assert!(rotator.rotate_keys().await.unwrap().rotated >= 1);
            assert!(rotator
                .write_refreshed("github", user, &read.fence(), &tokens("c1", "r2"))
                .await
                .unwrap());
            let now = rotator.get_link("github", user).await.unwrap().unwrap();
            assert_eq!(now.access_token.expose_secret(), "c1");
            // Likewise a failure record.
            let read = now;
            let again = b
                .store(keyring(EncryptionFormat::Coder, &[KEY_A, KEY_B]))
                .await;
            assert!(again.rotate_keys().await.unwrap().rotated >= 1);
            assert!(rotator
                .record_refresh_failure("github", user, &read.fence(), None, "revoked")
                .await
                .unwrap());
            let now = rotator.get_link("github", user).await.unwrap().unwrap();
            assert_eq!(now.refresh_failure_reason, "revoked");
            assert_eq!(now.access_token.expose_secret(), "c1");
        }
    }
}

/// Lease extension: moves only the holder's own lease (fenced by its exact
/// value), keeps other claimants out, and does nothing once the lease was taken
/// over or cleared by the write.
pub async fn lease_extension_is_fenced_by_the_holder(b: &dyn Backend) {
    let store = b.store(keyring(EncryptionFormat::Native, &[KEY_A])).await;
    let store = store.as_ref();
    let user = Uuid::new_v4();
    let old = put_and_read(store, user).await;
    let old_stored = &old.refresh_token_stored;

    let LeaseClaim::Acquired(first) = claim(store, user, old_stored).await else {
        panic!("first claim must acquire")
    };
    let extended = store
        .extend_refresh_lease(&first, Duration::from_secs(60))
        .await
        .unwrap()
        .expect("the holder extends its own lease");
    assert!(extended.expires_at > first.expires_at, "moved later");
    let row = store.get_link("github", user).await.unwrap().unwrap();
    assert_eq!(row.lease_expires_at, Some(extended.expires_at));
    match claim(store, user, old_stored).await {
        LeaseClaim::Held { until } => assert_eq!(until, extended.expires_at),
        other => panic!("expected Held, got {other:?}"),
    }
    // The value it replaced no longer identifies the holder.
    assert!(store
        .extend_refresh_lease(&first, Duration::from_secs(60))
        .await
        .unwrap()
        .is_none());

    // Taken over after expiry: the old holder cannot extend the new one's lease.
    b.expire_lease("github", user).await;
    let LeaseClaim::Acquired(second) = claim(store, user, old_stored).await else {
        panic!("an expired lease can be claimed")
    };
    assert!(store
        .extend_refresh_lease(&extended, Duration::from_secs(60))
        .await
        .unwrap()
        .is_none());
    let row = store.get_link("github", user).await.unwrap().unwrap();
    assert_eq!(row.lease_expires_at, Some(second.expires_at));

    // A successful write clears the lease: nothing left to extend.
    assert!(store
        .write_refreshed("github", user, &old.fence(), &tokens("a1", "r1"))
        .await
        .unwrap());
    assert!(store
        .extend_refresh_lease(&second, Duration::from_secs(60))
        .await
        .unwrap()
        .is_none());
}
