//! `tokenproxy link login` (device flow, RFC 8628) and `tokenproxy link status`.
//!
//! `link login` prints where to go and the code to enter, polls the provider as
//! RFC 8628 says (its `interval`, 5 s more on `slow_down`), and stores the link
//! once the user approved. Ctrl-C stops it between polls; nothing is stored then.

use anyhow::Context;
use chrono::Utc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::Config;
use crate::links::{self, LinkStatus};
use crate::oauth::device::{DeviceError, DeviceFlow};
use crate::telemetry::audit::{self, Actor};

/// Exit status when the user denied the request or the code expired.
pub const EXIT_NOT_APPROVED: u8 = 1;

/// Runs `link login --provider ID --user UUID`.
pub async fn login(cfg: &Config, provider: &str, user: Uuid) -> anyhow::Result<()> {
    let mut cfg = cfg.clone();
    // OIDC providers name their device endpoint in the discovery document.
    crate::oauth::presets::discover(&mut cfg).await?;
    let p = super::known_provider(&cfg, provider)?;
    let flow = DeviceFlow::new(p).map_err(super::usage)?.ok_or_else(|| {
        super::usage(format!(
            "provider `{provider}` has no device flow (set providers[].device_authorization_url)"
        ))
    })?;
    let store = super::open_store(&cfg)?;
    let failed = |step: &'static str| {
        move |e: DeviceError| {
            audit::device_login_failed(Actor::Cli, provider, user, step, e.code());
            device_failure(e)
        }
    };
    let code = flow.start().await.map_err(failed("start"))?;
    println!(
        "To link your {provider} account, open {}",
        code.verification_uri
    );
    println!("and enter the code: {}", code.user_code);
    if let Some(complete) = &code.verification_uri_complete {
        println!("(or open {complete})");
    }
    println!(
        "Waiting for approval (the code expires in {}s)…",
        code.expires_in.as_secs()
    );
    let stop = CancellationToken::new();
    let on_interrupt = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            on_interrupt.cancel();
        }
    });
    let tokens = flow.poll(&code, &stop).await.map_err(failed("poll"))?;
    let tokens = links::device::token_set(tokens, Utc::now());
    links::store_login(store.as_ref(), provider, user, &tokens, Actor::Cli)
        .await
        .inspect_err(|_| {
            audit::device_login_failed(Actor::Cli, provider, user, "store", "store_unavailable")
        })
        .context("storing the link")?;
    println!(
        "linked {provider}/{user} (expires {})",
        super::show_time(tokens.expiry, "never")
    );
    Ok(())
}

fn device_failure(e: DeviceError) -> anyhow::Error {
    let code = match e {
        DeviceError::Transient(_) => super::EXIT_UNAVAILABLE,
        _ => EXIT_NOT_APPROVED,
    };
    super::Failure {
        code,
        message: format!("device flow: {e}; nothing was stored"),
    }
    .into()
}

/// Runs `link status [--provider ID] [--user UUID] [--json]`.
pub async fn status(
    cfg: &Config,
    provider: Option<String>,
    user: Option<Uuid>,
    json: bool,
) -> anyhow::Result<()> {
    if let Some(p) = &provider {
        super::known_provider(cfg, p)?;
    }
    let store = super::open_store(cfg)?;
    let now = Utc::now();
    let mut list = links::statuses(store.as_ref(), user, provider.as_deref(), now)
        .await
        .context("reading links")?;
    if list.is_empty() {
        if let (Some(p), Some(u)) = (&provider, user) {
            list.push(LinkStatus::missing(p, u));
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        print!("{}", table(&list));
    }
    Ok(())
}

fn table(list: &[LinkStatus]) -> String {
    let t = |v: Option<chrono::DateTime<Utc>>, none: &str| super::show_time(v, none);
    let mut rows = vec![[
        "PROVIDER".to_string(),
        "USER".into(),
        "LINKED".into(),
        "ACCESS EXPIRY".into(),
        "REFRESH EXPIRY".into(),
        "LAST REFRESH".into(),
        "FAILURE".into(),
    ]];
    for s in list {
        let refresh = match (s.refresh_expiry, s.refresh_expiring_soon) {
            (Some(at), true) => format!("{} (within 7 days)", t(Some(at), "")),
            (at, _) => t(at, "-"),
        };
        rows.push([
            s.provider.clone(),
            s.user.to_string(),
            if s.linked { "yes" } else { "no" }.into(),
            if s.linked {
                t(s.access_expiry, "never")
            } else {
                "-".into()
            },
            refresh,
            t(s.last_refresh, "-"),
            s.failure_reason
                .as_deref()
                .map(|r| r.replace(['\n', '\r'], " "))
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    super::link::render(&rows)
}
