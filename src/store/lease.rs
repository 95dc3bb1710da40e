//! The lease-claim loop both backends share.
//!
//! A claim is one conditional write; when it does not apply, a second read (on
//! the database clock) says why: the link changed or went away, another holder's
//! lease is still running, or the lease ran out in between and the claim is
//! worth another try. That decision is the same for every backend, so it lives
//! here; each backend supplies the two statements and its timestamp type.

use std::future::Future;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Lease, LeaseClaim, StoreError, StoredSecret, CLAIM_ATTEMPTS};

/// The row as read after a missed claim: the refresh token exactly as stored,
/// the lease's end (if any), and the database clock, as the backend stores times.
pub(super) type Missed<T> = Option<(String, Option<T>, T)>;

/// Claims the lease for `user_id`'s `provider_id` link while it still holds
/// `old_refresh`: `attempt` is the conditional write (the new lease's end when
/// it applied), `reread` the read that explains a miss, `time` reads a stored
/// timestamp.
pub(super) async fn claim<T, A, AF, R, RF>(
    provider_id: &str,
    user_id: Uuid,
    old_refresh: &StoredSecret,
    mut attempt: A,
    mut reread: R,
    time: impl Fn(&T) -> Result<DateTime<Utc>, StoreError>,
) -> Result<LeaseClaim, StoreError>
where
    A: FnMut() -> AF,
    AF: Future<Output = Result<Option<T>, StoreError>>,
    R: FnMut() -> RF,
    RF: Future<Output = Result<Missed<T>, StoreError>>,
{
    for _ in 0..CLAIM_ATTEMPTS {
        if let Some(expires_at) = attempt().await? {
            return Ok(LeaseClaim::Acquired(Lease {
                provider_id: provider_id.to_owned(),
                user_id,
                expires_at: time(&expires_at)?,
            }));
        }
        // Why not? Ask with the database clock again.
        match reread().await? {
            None => return Ok(LeaseClaim::Changed),
            Some((stored, _, _)) if StoredSecret(stored.clone()) != *old_refresh => {
                return Ok(LeaseClaim::Changed)
            }
            Some((_, Some(until), now)) => {
                let until = time(&until)?;
                if until > time(&now)? {
                    return Ok(LeaseClaim::Held { until });
                }
            }
            // The lease ran out (or was released) in between: try again.
            Some(_) => {}
        }
    }
    Ok(LeaseClaim::Changed)
}
