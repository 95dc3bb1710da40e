//! `POST` and `GET /_tokenproxy/device/{provider}`: a caller presenting its proxy
//! token starts a device-flow login for its own user and asks how it stands.
//! The flows themselves live in [`crate::links::device`]; this is only the HTTP
//! face: who is asking, which provider, and the JSON answer.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};

use super::caller::CallerIdentity;
use super::endpoints::json;
use super::error::ProxyError;
use super::ProxyBody;
use crate::links::device::{DeviceLogins, StartError};
use crate::oauth::device::DeviceError;
use crate::tokens::TokenError;

/// Answers one request for `provider`'s device flow.
pub(super) async fn handle<B>(
    logins: &Arc<DeviceLogins>,
    req: &Request<B>,
    callers: &CallerIdentity,
    provider: &str,
) -> Result<Response<ProxyBody>, ProxyError> {
    if req.method() != Method::POST && req.method() != Method::GET {
        return Err(ProxyError::BadRequest(
            "the device flow is started with POST and followed with GET",
        ));
    }
    let caller = callers.identify(req.headers()).await?;
    if !caller.may_use(provider) {
        return Err(ProxyError::Forbidden);
    }
    if !logins.supports(provider) {
        return Err(ProxyError::BadRequest(
            "this provider has no device authorization endpoint",
        ));
    }
    let view = if req.method() == Method::POST {
        logins
            .start(provider, caller.user_id)
            .await
            .map_err(|e| {
                tracing::warn!(provider, user = %caller.user_id, error = %e, "cannot start a device flow");
                match e {
                    StartError::Unsupported => {
                        ProxyError::BadRequest("this provider has no device authorization endpoint")
                    }
                    StartError::Provider(DeviceError::Transient(_) | DeviceError::Refused(_))
                    | StartError::Provider(_) => ProxyError::Token(TokenError::IdpUnavailable),
                }
            })?
    } else {
        logins
            .status(provider, caller.user_id)
            .await
            .map_err(|_| ProxyError::StoreUnavailable)?
    };
    let body = serde_json::to_value(&view).unwrap_or_default();
    Ok(json(StatusCode::OK, &body))
}
