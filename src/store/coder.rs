//! Coder mode: what tokenproxy reads from a live Coder database beside
//! `external_auth_links` — the workspace owner behind an agent token, and the
//! start-up checks that refuse a Coder database tokenproxy cannot share safely.
//!
//! Modelled on coder/coder (main, late 2026): the agent lookup is coderd's
//! `GetAuthenticatedWorkspaceAgentAndBuildByAuthToken` (`coderd/database/queries/
//! workspaceagents.sql`, used by `coderd/httpmw/workspaceagent.go`), reduced to
//! the owner it resolves; the key checks follow
//! dbcrypt's rules (`dbcrypt_keys.test` holds the encryption of `coder`, a revoked
//! primary key must not be used, every key id in use must be one we hold). Nothing
//! here writes to Coder's tables.

use secrecy::ExposeSecret;
use sqlx::PgPool;
use uuid::Uuid;

use super::postgres::map_err;
use super::StoreError;
use crate::crypto::{Keyring, ValueContext, CODER_TEST_VALUE};

/// The owner of the workspace whose agent holds `auth_token`, resolved as coderd
/// resolves it: the agent (not a deleted sub-agent) → its resource → the build
/// of that resource's job → the workspace, which must not be deleted. The build
/// must be the workspace's latest, with coderd's one exception for shutdown
/// scripts: the agent of a `start` build whose job succeeded keeps working while
/// the very next build — the latest — is a `stop` whose job is still pending or
/// running. Once that stop job ends, or any later build exists, it is refused.
/// `None` when any step fails, exactly when coderd answers 401.
///
/// Modelled on coderd's `GetAuthenticatedWorkspaceAgentAndBuildByAuthToken`
/// (coder/coder `coderd/database/queries/workspaceagents.sql`, the version of
/// PR #21538 "allow agent auth during workspace shutdown", fixing #19467, which
/// renamed `GetWorkspaceAgentAndLatestBuildByAuthToken`), condition for
/// condition. coderd joins the `workspace_build_with_user` view; it only adds
/// the initiator's name to `workspace_builds`, so the plain table gives the
/// same rows.
pub async fn agent_owner(pool: &PgPool, auth_token: Uuid) -> Result<Option<Uuid>, StoreError> {
    sqlx::query_scalar(AGENT_OWNER)
        .bind(auth_token)
        .fetch_optional(pool)
        .await
        .map_err(map_err)
}

/// The statement of [`agent_owner`]; the `CASE` is coderd's, short-circuiting on
/// the common case (the agent's build is the latest) first.
const AGENT_OWNER: &str = "\
SELECT workspaces.owner_id
FROM workspace_agents
JOIN workspace_resources ON workspace_agents.resource_id = workspace_resources.id
JOIN workspace_builds ON workspace_resources.job_id = workspace_builds.job_id
JOIN workspaces ON workspace_builds.workspace_id = workspaces.id
WHERE workspace_agents.auth_token = $1
  AND workspaces.deleted = FALSE
  AND workspace_agents.deleted = FALSE
  AND CASE
    WHEN workspace_builds.build_number = (
        SELECT MAX(build_number) FROM workspace_builds AS wb
        WHERE wb.workspace_id = workspace_builds.workspace_id) THEN TRUE
    WHEN workspace_builds.transition = 'start'
      AND (SELECT job_status FROM provisioner_jobs
           WHERE id = workspace_builds.job_id) = 'succeeded'
      AND EXISTS (
        SELECT 1 FROM workspace_builds latest
        JOIN provisioner_jobs pj ON pj.id = latest.job_id
        WHERE latest.workspace_id = workspace_builds.workspace_id
          AND latest.build_number = workspace_builds.build_number + 1
          AND latest.build_number = (
              SELECT MAX(build_number) FROM workspace_builds l2
              WHERE l2.workspace_id = latest.workspace_id)
          AND latest.transition = 'stop'
          AND pj.job_status IN ('pending', 'running')) THEN TRUE
    ELSE FALSE
  END";

/// Refuses a Coder database without Coder's refresh lease: without the column and
/// the function, coderd and tokenproxy would not exclude each other and could
/// exchange the same single-use refresh token.
pub async fn check_lease_support(pool: &PgPool) -> Result<(), StoreError> {
    let column: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_attribute \
         WHERE attrelid = to_regclass('external_auth_links') \
           AND attname = 'refresh_lease_expires_at' AND NOT attisdropped)",
    )
    .fetch_one(pool)
    .await
    .map_err(map_err)?;
    if !column {
        return Err(StoreError::Other(
            "Coder database has no external_auth_links.refresh_lease_expires_at \
             (upgrade Coder to a release with the refresh lease)"
                .into(),
        ));
    }
    let function: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
         WHERE n.nspname = ANY (current_schemas(false)) \
           AND p.proname = 'acquire_external_auth_link_refresh_lease')",
    )
    .fetch_one(pool)
    .await
    .map_err(map_err)?;
    if !function {
        return Err(StoreError::Other(
            "Coder database has no function acquire_external_auth_link_refresh_lease \
             (upgrade Coder to a release with the refresh lease)"
                .into(),
        ));
    }
    Ok(())
}

/// Refuses keys Coder would refuse, and rows we could not read: the primary key
/// must be active in `dbcrypt_keys` (present, not revoked) and its `test` value
/// must decrypt to `coder` — the same check coderd makes — and every key id used
/// in `external_auth_links` must be one of ours. Reads `dbcrypt_keys`, never
/// writes it. Errors name key ids (digest prefixes, not secrets), never values.
pub async fn check_keys(pool: &PgPool, keyring: &Keyring) -> Result<(), StoreError> {
    let ours = keyring.coder_key_ids();
    if let Some(primary) = ours.first() {
        let row: Option<(Option<String>, Option<String>, String)> = sqlx::query_as(
            "SELECT active_key_digest, revoked_key_digest, test FROM dbcrypt_keys \
             WHERE active_key_digest = $1 OR revoked_key_digest = $1",
        )
        .bind(primary)
        .fetch_optional(pool)
        .await
        .map_err(map_err)?;
        let Some((active, _revoked, test)) = row else {
            return Err(StoreError::Other(format!(
                "primary encryption key {primary} is not in Coder's dbcrypt_keys \
                 (start coderd with it first)"
            )));
        };
        if active.as_deref() != Some(primary.as_str()) {
            return Err(StoreError::Other(format!(
                "primary encryption key {primary} is revoked in Coder's dbcrypt_keys"
            )));
        }
        let ctx = ValueContext {
            provider_id: "",
            user_id: Uuid::nil(),
            column: "test",
        };
        let opened = keyring.open(&test, Some(primary), ctx);
        if !opened.is_ok_and(|t| t.expose_secret() == CODER_TEST_VALUE) {
            return Err(StoreError::Other(format!(
                "dbcrypt_keys.test of key {primary} does not decrypt to \"coder\" with \
                 the configured key"
            )));
        }
    }
    let used: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT k FROM ( \
           SELECT oauth_access_token_key_id AS k FROM external_auth_links \
           UNION SELECT oauth_refresh_token_key_id FROM external_auth_links) ids \
         WHERE k IS NOT NULL AND k <> '' ORDER BY k",
    )
    .fetch_all(pool)
    .await
    .map_err(map_err)?;
    if let Some(unknown) = used.iter().find(|id| !ours.contains(id)) {
        return Err(StoreError::Other(format!(
            "external_auth_links has values encrypted with key {unknown}, which is not \
             in coder.encryption_keys"
        )));
    }
    Ok(())
}
