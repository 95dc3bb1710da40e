//! Coder mode against a database built from Coder's own schema
//! (`tests/fixtures/coder_schema.sql`, written from coder/coder's dump.sql): the
//! agent-token lookup, the start-up checks of the lease and of dbcrypt keys, and
//! rows in Coder's encrypted format read back.
//!
//! Known-answer values were computed independently with Python's `cryptography`
//! (key = bytes(range(32)), nonce = bytes(range(0xa0, 0xac)), no associated data):
//! `base64.b64encode(nonce + AESGCM(key).encrypt(nonce, pt, None))`.

#[path = "support/proxy_harness.rs"]
mod harness;
mod support;

use std::sync::Arc;

use base64::Engine;
use harness::{get, FakeTokens, Harness};
use secrecy::{ExposeSecret, SecretBox};
use sqlx::PgPool;
use support::upstream::{tokens, CredentialForm, TestUpstream};
use tokenproxy::config::EncryptionFormat;
use tokenproxy::crypto::Keyring;
use tokenproxy::store::coder::{agent_owner, check_keys, check_lease_support};
use tokenproxy::store::postgres::PgStore;
use tokenproxy::store::LinkStore;
use uuid::Uuid;

const CODER_SCHEMA: &str = include_str!("fixtures/coder_schema.sql");
/// Coder key id of bytes 00..1f.
const KAT_KEY_ID: &str = "6d28cf8";
/// `dbcrypt_keys.test` as coderd writes it: the encryption of "coder".
const KAT_TEST: &str = "oKGio6SlpqeoqaqrhXcYSDf2nFoNsjj8nsDkMo2nEys6";
/// The encryption of "" — what coderd stores as the refresh token after a
/// permanent failure when encryption is on.
const KAT_EMPTY: &str = "oKGio6SlpqeoqaqrXGmWJa9Lk6D4IgoqYRnF0A==";
/// The encryption of "gho_test-access-token" (tests/crypto.rs).
const KAT_ACCESS: &str = "oKGio6SlpqeoqaqrgXATcjGucctPBOSwYgmz8wTDMnX8RAt1mZnq0n0Mc5kKaHWpQw==";

fn kat_key() -> [u8; 32] {
    std::array::from_fn(|i| i as u8)
}

fn keyring(keys: &[[u8; 32]]) -> Keyring {
    Keyring::new(
        keys.iter().map(|k| SecretBox::new(Box::new(*k))).collect(),
        EncryptionFormat::Coder,
    )
}

async fn coder_db(pool: &PgPool) {
    sqlx::raw_sql(CODER_SCHEMA).execute(pool).await.unwrap();
}

async fn exec(pool: &PgPool, sql: &str) {
    sqlx::query(sql).execute(pool).await.unwrap();
}

/// A workspace of `owner` whose builds are numbered from 1; returns its id.
async fn workspace(pool: &PgPool, owner: Uuid) -> Uuid {
    sqlx::query(
        "INSERT INTO users (id, email, username, hashed_password, created_at, updated_at, status) \
         VALUES ($1, $1::text || '@example.com', 'u' || left($1::text, 8), '', now(), now(), 'active') \
         ON CONFLICT DO NOTHING",
    )
    .bind(owner)
    .execute(pool)
    .await
    .unwrap();
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO workspaces (id, created_at, updated_at, owner_id, organization_id, \
         template_id, name) VALUES ($1, now(), now(), $2, $3, $4, 'ws')",
    )
    .bind(id)
    .bind(owner)
    .bind(Uuid::new_v4())
    .bind(Uuid::new_v4())
    .execute(pool)
    .await
    .unwrap();
    id
}

/// The state of a build's provisioner job, as coderd's generated `job_status`
/// derives it from the job's timestamps and error.
#[derive(Clone, Copy)]
enum Job {
    Pending,
    Running,
    Succeeded,
    Failed,
}

impl Job {
    /// `started_at`, `completed_at` and `error` giving this status.
    fn columns(self) -> &'static str {
        match self {
            Job::Pending => "started_at = NULL, completed_at = NULL, error = NULL",
            Job::Running => "started_at = now(), completed_at = NULL, error = NULL",
            Job::Succeeded => "started_at = now(), completed_at = now(), error = NULL",
            Job::Failed => "started_at = now(), completed_at = now(), error = 'apply failed'",
        }
    }
}

/// Build `number` of `workspace` with one resource and one agent, the way the
/// provisioner records them (the resource belongs to the build's job), its job
/// succeeded; returns the agent's auth token.
async fn build(pool: &PgPool, workspace: Uuid, number: i32, transition: &str) -> Uuid {
    build_with_job(pool, workspace, number, transition, Job::Succeeded).await
}

/// [`build`] with its provisioner job in state `job`.
async fn build_with_job(
    pool: &PgPool,
    workspace: Uuid,
    number: i32,
    transition: &str,
    job_state: Job,
) -> Uuid {
    let job = Uuid::new_v4();
    let resource = Uuid::new_v4();
    let token = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO provisioner_jobs (id, created_at, updated_at, organization_id, initiator_id) \
         VALUES ($1, now(), now(), $2, $3)",
    )
    .bind(job)
    .bind(Uuid::new_v4())
    .bind(Uuid::new_v4())
    .execute(pool)
    .await
    .unwrap();
    set_job(pool, job, job_state).await;
    sqlx::query(
        "INSERT INTO workspace_builds (id, created_at, updated_at, workspace_id, \
         template_version_id, build_number, transition, initiator_id, job_id) \
         VALUES ($1, now(), now(), $2, $3, $4, $5::workspace_transition, $6, $7)",
    )
    .bind(Uuid::new_v4())
    .bind(workspace)
    .bind(Uuid::new_v4())
    .bind(number)
    .bind(transition)
    .bind(Uuid::new_v4())
    .bind(job)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO workspace_resources (id, created_at, job_id, transition, type, name) \
         VALUES ($1, now(), $2, $3::workspace_transition, 'docker_container', 'main')",
    )
    .bind(resource)
    .bind(job)
    .bind(transition)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO workspace_agents (id, created_at, updated_at, name, resource_id, \
         auth_token, architecture, operating_system) \
         VALUES ($1, now(), now(), 'main', $2, $3, 'amd64', 'linux')",
    )
    .bind(Uuid::new_v4())
    .bind(resource)
    .bind(token)
    .execute(pool)
    .await
    .unwrap();
    token
}

/// Moves the provisioner job `job` to `state`.
async fn set_job(pool: &PgPool, job: Uuid, state: Job) {
    sqlx::query(&format!(
        "UPDATE provisioner_jobs SET {} WHERE id = $1",
        state.columns()
    ))
    .bind(job)
    .execute(pool)
    .await
    .unwrap();
}

/// The job of build `number` of `workspace`.
async fn job_of(pool: &PgPool, workspace: Uuid, number: i32) -> Uuid {
    sqlx::query_scalar(
        "SELECT job_id FROM workspace_builds WHERE workspace_id = $1 AND build_number = $2",
    )
    .bind(workspace)
    .bind(number)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[sqlx::test(migrations = false)]
async fn agent_token_resolves_to_the_workspace_owner_like_coderd(pool: PgPool) {
    coder_db(&pool).await;
    let owner = Uuid::new_v4();
    let ws = workspace(&pool, owner).await;
    let first = build(&pool, ws, 1, "start").await;
    assert_eq!(agent_owner(&pool, first).await.unwrap(), Some(owner));

    // Unknown token.
    assert_eq!(agent_owner(&pool, Uuid::new_v4()).await.unwrap(), None);

    // A newer build supersedes the first one: its agent's token no longer works.
    let second = build(&pool, ws, 2, "start").await;
    assert_eq!(agent_owner(&pool, first).await.unwrap(), None);
    assert_eq!(agent_owner(&pool, second).await.unwrap(), Some(owner));

    // A deleted (sub-)agent is refused.
    sqlx::query("UPDATE workspace_agents SET deleted = TRUE WHERE auth_token = $1")
        .bind(second)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(agent_owner(&pool, second).await.unwrap(), None);

    // A deleted workspace is refused, whatever its builds.
    let other_owner = Uuid::new_v4();
    let ws2 = workspace(&pool, other_owner).await;
    let t = build(&pool, ws2, 1, "start").await;
    assert_eq!(agent_owner(&pool, t).await.unwrap(), Some(other_owner));
    sqlx::query("UPDATE workspaces SET deleted = TRUE WHERE id = $1")
        .bind(ws2)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(agent_owner(&pool, t).await.unwrap(), None);
}

#[sqlx::test(migrations = false)]
async fn the_start_agent_keeps_working_while_its_stop_build_runs_like_coderd(pool: PgPool) {
    coder_db(&pool).await;
    let owner = Uuid::new_v4();
    let ws = workspace(&pool, owner).await;
    let served = |t: Uuid| {
        let pool = pool.clone();
        async move { agent_owner(&pool, t).await.unwrap() == Some(owner) }
    };

    // The stop build is queued, then running: the start build's agent (for its
    // shutdown scripts) still acts for the owner; the stop build's own agent too,
    // since its build is the latest.
    let start = build(&pool, ws, 1, "start").await;
    let stop_agent = build_with_job(&pool, ws, 2, "stop", Job::Pending).await;
    assert!(served(start).await, "stop build pending");
    assert!(served(stop_agent).await, "the latest build's agent");
    let stop_job = job_of(&pool, ws, 2).await;
    set_job(&pool, stop_job, Job::Running).await;
    assert!(served(start).await, "stop build running");
    // The stop is over, whichever way it ended: the start agent is refused.
    set_job(&pool, stop_job, Job::Succeeded).await;
    assert!(!served(start).await, "stop build succeeded");
    set_job(&pool, stop_job, Job::Failed).await;
    assert!(!served(start).await, "stop build failed");

    // Only the start build just before the stop: not an older one.
    let older = build(&pool, ws, 3, "start").await;
    let newer = build(&pool, ws, 4, "start").await;
    build_with_job(&pool, ws, 5, "stop", Job::Running).await;
    assert!(served(newer).await, "adjacent start build");
    assert!(!served(older).await, "superseded start build");

    // A start build whose job failed gets no exception.
    let failed = build_with_job(&pool, ws, 6, "start", Job::Failed).await;
    build_with_job(&pool, ws, 7, "stop", Job::Running).await;
    assert!(!served(failed).await, "failed start build");

    // A running delete is not a stop.
    let last = build(&pool, ws, 8, "start").await;
    build_with_job(&pool, ws, 9, "delete", Job::Running).await;
    assert!(!served(last).await, "delete build running");

    // A stop build after a stop build: the exception is for start agents only.
    let stopped = build(&pool, ws, 10, "stop").await;
    build_with_job(&pool, ws, 11, "stop", Job::Running).await;
    assert!(!served(stopped).await, "stop agent before a stop build");

    // The deleted-workspace rule still wins.
    let final_start = build(&pool, ws, 12, "start").await;
    build_with_job(&pool, ws, 13, "stop", Job::Running).await;
    assert!(served(final_start).await);
    exec(
        &pool,
        &format!("UPDATE workspaces SET deleted = TRUE WHERE id = '{ws}'"),
    )
    .await;
    assert!(!served(final_start).await, "deleted workspace");
}

#[sqlx::test(migrations = false)]
async fn refuses_a_coder_database_without_the_lease(pool: PgPool) {
    coder_db(&pool).await;
    check_lease_support(&pool).await.unwrap();
    exec(
        &pool,
        "DROP FUNCTION acquire_external_auth_link_refresh_lease(text, uuid, bigint)",
    )
    .await;
    let e = check_lease_support(&pool).await.unwrap_err().to_string();
    assert!(
        e.contains("acquire_external_auth_link_refresh_lease"),
        "{e}"
    );
    exec(
        &pool,
        "ALTER TABLE external_auth_links DROP COLUMN refresh_lease_expires_at",
    )
    .await;
    let e = check_lease_support(&pool).await.unwrap_err().to_string();
    assert!(e.contains("refresh_lease_expires_at"), "{e}");
}

async fn insert_key(
    pool: &PgPool,
    number: i32,
    active: Option<&str>,
    revoked: Option<&str>,
    test: &str,
) {
    sqlx::query(
        "INSERT INTO dbcrypt_keys (number, active_key_digest, revoked_key_digest, test) \
         VALUES ($1, $2, $3, $4)",
    )
    .bind(number)
    .bind(active)
    .bind(revoked)
    .bind(test)
    .execute(pool)
    .await
    .unwrap();
}

#[sqlx::test(migrations = false)]
async fn key_checks_follow_dbcrypt(pool: PgPool) {
    coder_db(&pool).await;
    let kr = keyring(&[kat_key()]);
    // Not registered by coderd yet.
    let e = check_keys(&pool, &kr).await.unwrap_err().to_string();
    assert!(e.contains("not in Coder's dbcrypt_keys"), "{e}");

    // Registered by coderd: its test value (written independently) checks out.
    insert_key(&pool, 1, Some(KAT_KEY_ID), None, KAT_TEST).await;
    check_keys(&pool, &kr).await.unwrap();

    // A test value that is not "coder" under this key: refused.
    exec(
        &pool,
        &format!("UPDATE dbcrypt_keys SET test = '{KAT_EMPTY}'"),
    )
    .await;
    let e = check_keys(&pool, &kr).await.unwrap_err().to_string();
    assert!(e.contains("does not decrypt to \"coder\""), "{e}");
    exec(
        &pool,
        &format!("UPDATE dbcrypt_keys SET test = '{KAT_TEST}'"),
    )
    .await;

    // Rows encrypted with a key we do not hold: refused, naming the key id.
    insert_key(&pool, 2, Some("abcdef0"), None, "x").await;
    exec(
        &pool,
        "INSERT INTO external_auth_links (provider_id, user_id, created_at, updated_at, \
         oauth_access_token, oauth_access_token_key_id, oauth_refresh_token, oauth_expiry) \
         VALUES ('github', gen_random_uuid(), now(), now(), 'c', 'abcdef0', '', now())",
    )
    .await;
    let e = check_keys(&pool, &kr).await.unwrap_err().to_string();
    assert!(e.contains("abcdef0"), "{e}");
    exec(&pool, "DELETE FROM external_auth_links").await;
    check_keys(&pool, &kr).await.unwrap();

    // Coder revoked our primary key: refused.
    exec(
        &pool,
        &format!(
            "UPDATE dbcrypt_keys SET active_key_digest = NULL, revoked_key_digest = \
             '{KAT_KEY_ID}', revoked_at = now() WHERE number = 1"
        ),
    )
    .await;
    let e = check_keys(&pool, &kr).await.unwrap_err().to_string();
    assert!(e.contains("revoked"), "{e}");
}

#[sqlx::test(migrations = false)]
async fn serves_rows_a_coder_writer_encrypted_including_the_failure_convention(pool: PgPool) {
    coder_db(&pool).await;
    insert_key(&pool, 1, Some(KAT_KEY_ID), None, KAT_TEST).await;
    let live = Uuid::new_v4();
    let failed = Uuid::new_v4();
    for (user, refresh, reason) in [
        (live, KAT_ACCESS, ""),
        // coderd after invalid_grant with encryption on: the ciphertext of "".
        (failed, KAT_EMPTY, "invalid_grant: Bad refresh token"),
    ] {
        sqlx::query(
            "INSERT INTO external_auth_links (provider_id, user_id, created_at, updated_at, \
             oauth_access_token, oauth_access_token_key_id, oauth_refresh_token, \
             oauth_refresh_token_key_id, oauth_expiry, oauth_refresh_failure_reason) \
             VALUES ('github', $1, now(), now(), $2, $3, $4, $3, now() + interval '1 hour', $5)",
        )
        .bind(user)
        .bind(KAT_ACCESS)
        .bind(KAT_KEY_ID)
        .bind(refresh)
        .bind(reason)
        .execute(&pool)
        .await
        .unwrap();
    }
    let kr = keyring(&[kat_key()]);
    check_keys(&pool, &kr).await.unwrap();
    let store = PgStore::from_pool(pool, kr);
    let link = store.get_link("github", live).await.unwrap().unwrap();
    assert_eq!(link.access_token.expose_secret(), "gho_test-access-token");
    assert_eq!(link.refresh_token.expose_secret(), "gho_test-access-token");
    let link = store.get_link("github", failed).await.unwrap().unwrap();
    // "No refresh token" is known only after decrypting.
    assert_eq!(link.refresh_token.expose_secret(), "");
    assert_eq!(
        link.refresh_failure_reason,
        "invalid_grant: Bad refresh token"
    );
}

const GH_TOKEN: &str = "gho_workspace_owner";

fn agent_config(upstream: &str) -> tokenproxy::config::Config {
    harness::config(&format!(
        r#"
[callers]
mode = "coder_agent"
cache_ttl = "1h"

[[providers]]
id = "github"
client_id = "cid"
token_url = "http://127.0.0.1:9/token"

  [[providers.routes]]
  prefix = "/gh/api"
  upstream = "{upstream}"
"#
    ))
}

#[sqlx::test(migrations = false)]
async fn agent_tokens_act_for_the_workspace_owner_through_the_proxy(pool: PgPool) {
    coder_db(&pool).await;
    let api = TestUpstream::start(CredentialForm::Bearer, tokens(&[GH_TOKEN])).await;
    let owner = Uuid::new_v4();
    let ws = workspace(&pool, owner).await;
    let old = build(&pool, ws, 1, "start").await;
    let agent = build(&pool, ws, 2, "start").await;
    // A workspace shutting down: its start build's agent runs shutdown scripts
    // while the stop build's job runs.
    let stopping_owner = Uuid::new_v4();
    let stopping_ws = workspace(&pool, stopping_owner).await;
    let stopping = build(&pool, stopping_ws, 1, "start").await;
    build_with_job(&pool, stopping_ws, 2, "stop", Job::Running).await;
    let gone_owner = Uuid::new_v4();
    let gone_ws = workspace(&pool, gone_owner).await;
    let gone = build(&pool, gone_ws, 1, "start").await;
    exec(
        &pool,
        &format!("UPDATE workspaces SET deleted = TRUE WHERE id = '{gone_ws}'"),
    )
    .await;

    let fake = FakeTokens::new();
    fake.set("github", owner, GH_TOKEN);
    fake.set("github", gone_owner, GH_TOKEN);
    fake.set("github", stopping_owner, GH_TOKEN);
    let store = Arc::new(PgStore::from_pool(pool, Keyring::plaintext()));
    let proxy = Harness::start(agent_config(&api.url()), store, fake).await;
    let url = proxy.url("/gh/api/user");

    let git = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("coder:{agent}"))
    );
    let bearer = format!("Bearer {agent}");
    let session = agent.to_string();
    for h in [
        ("coder-session-token", session.as_str()),
        ("authorization", bearer.as_str()),
        ("authorization", git.as_str()),
    ] {
        let a = get(&url, &[h]).await;
        assert_eq!(a.status, 200, "{}", h.0);
    }
    let shutdown = format!("Bearer {stopping}");
    let a = get(&url, &[("authorization", shutdown.as_str())]).await;
    assert_eq!(a.status, 200, "the start agent during its stop build");
    let seen = api.requests();
    assert_eq!(seen.len(), 4);
    for r in &seen {
        assert_eq!(
            r.token.as_deref(),
            Some(GH_TOKEN),
            "the owner's link is injected"
        );
        assert!(
            r.headers.get("coder-session-token").is_none(),
            "the agent token never reaches the upstream"
        );
    }

    // Unknown agent, superseded build, deleted workspace, nothing at all: 401.
    let unknown = format!("Bearer {}", Uuid::new_v4());
    let superseded = format!("Bearer {old}");
    let deleted = format!("Bearer {gone}");
    for auth in [
        unknown.as_str(),
        superseded.as_str(),
        deleted.as_str(),
        "Bearer tpx_x",
    ] {
        get(&url, &[("authorization", auth)])
            .await
            .assert_error(401, "unauthenticated");
    }
    get(&url, &[]).await.assert_error(401, "unauthenticated");
    assert_eq!(api.count(), 4, "refused callers never reach the upstream");
}

#[test]
fn coder_section_takes_coders_comma_separated_keys() {
    let b64 = |k: [u8; 32]| base64::engine::general_purpose::STANDARD.encode(k);
    let keys = format!("{},{}", b64(kat_key()), b64([7; 32]));
    let env = [(
        "CODER_EXTERNAL_TOKEN_ENCRYPTION_KEYS".to_string(),
        keys.clone(),
    )];
    let toml = r#"
[coder]
access_url = "https://coder.example.com"
encryption_keys = "env:CODER_EXTERNAL_TOKEN_ENCRYPTION_KEYS"
"#;
    let cfg = tokenproxy::config::Config::from_toml_with_env(toml, &env).unwrap();
    assert_eq!(cfg.encryption_format(), EncryptionFormat::Coder);
    let kr = Keyring::new(cfg.encryption_keys(), cfg.encryption_format());
    assert_eq!(kr.coder_key_ids().len(), 2);
    assert_eq!(
        kr.primary_key_id(),
        Some(KAT_KEY_ID),
        "the first key encrypts"
    );

    let bad = [(
        "CODER_EXTERNAL_TOKEN_ENCRYPTION_KEYS".to_string(),
        format!("{},not-a-key", b64(kat_key())),
    )];
    let e = tokenproxy::config::Config::from_toml_with_env(toml, &bad)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("coder.encryption_keys") && e.contains("key 2"),
        "{e}"
    );
    assert!(
        !e.contains(&b64(kat_key())),
        "no key material in errors: {e}"
    );

    let both = format!("{toml}\n[encryption]\nkeys = [\"{}\"]\n", b64(kat_key()));
    let e = tokenproxy::config::Config::from_toml_with_env(&both, &env)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not both"), "{e}");
}

#[sqlx::test(migrations = false)]
async fn start_up_check_refuses_what_coderd_would(pool: PgPool) {
    coder_db(&pool).await;
    insert_key(&pool, 1, Some(KAT_KEY_ID), None, KAT_TEST).await;
    let store = PgStore::from_pool(pool.clone(), keyring(&[kat_key()]));
    store.check_coder_database().await.unwrap();
    // Another key as primary: not in dbcrypt_keys.
    let other = PgStore::from_pool(pool.clone(), keyring(&[[9; 32], kat_key()]));
    let e = other.check_coder_database().await.unwrap_err().to_string();
    assert!(e.contains("not in Coder's dbcrypt_keys"), "{e}");
    exec(
        &pool,
        "DROP FUNCTION acquire_external_auth_link_refresh_lease(text, uuid, bigint)",
    )
    .await;
    let e = store.check_coder_database().await.unwrap_err().to_string();
    assert!(
        e.contains("acquire_external_auth_link_refresh_lease"),
        "{e}"
    );
}

#[sqlx::test(migrations = false)]
async fn proxy_tokens_work_beside_agent_tokens_only_when_enabled(pool: PgPool) {
    use tokenproxy::config::CoderConfig;
    use tokenproxy::store::coder_store::{CoderOptions, CoderStore};
    coder_db(&pool).await;
    let api = TestUpstream::start(CredentialForm::Bearer, tokens(&[GH_TOKEN])).await;
    let owner = Uuid::new_v4();
    let ws = workspace(&pool, owner).await;
    let agent = build(&pool, ws, 1, "start").await;
    let store = Arc::new(CoderStore::from_connect_options(
        pool.connect_options().as_ref().clone(),
        Keyring::plaintext(),
        CoderOptions::default(),
    ));
    store.migrate().await.unwrap();
    let (_, tpx) = harness::create_token(&*store, owner, &[]).await;
    let fake = FakeTokens::new();
    fake.set("github", owner, GH_TOKEN);
    for (enabled, tpx_status) in [(false, 401), (true, 200)] {
        let mut cfg = agent_config(&api.url());
        cfg.coder = Some(CoderConfig {
            proxy_tokens: enabled,
            ..CoderConfig::default()
        });
        let proxy = Harness::start(cfg, store.clone(), fake.clone()).await;
        let url = proxy.url("/gh/api/user");
        let by_agent = format!("Bearer {agent}");
        assert_eq!(get(&url, &[("authorization", &by_agent)]).await.status, 200);
        let by_tpx = format!("Bearer {tpx}");
        let a = get(&url, &[("authorization", &by_tpx)]).await;
        assert_eq!(a.status, tpx_status, "coder.proxy_tokens = {enabled}");
        proxy.shutdown().await;
    }
    store.pool().close().await;
}
