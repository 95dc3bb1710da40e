//! `tokenproxy healthcheck`: asks the admin listener's `/healthz` and exits 0 on a 200.
//! It exists so container images need no curl: the Dockerfile's HEALTHCHECK runs it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::Config;

/// How long the whole check may take.
const DEADLINE: Duration = Duration::from_secs(3);

/// `healthcheck` arguments.
#[derive(Debug, clap::Args)]
pub struct HealthcheckArgs {
    /// Admin address to ask [default: server.admin_listen from the config].
    #[arg(long)]
    pub addr: Option<SocketAddr>,
}

/// Runs the check.
pub async fn run(path: &Path, args: HealthcheckArgs) -> anyhow::Result<()> {
    let addr = match args.addr {
        Some(a) => a,
        None => loopback_for(Config::load(path)?.server.admin_listen),
    };
    let status = tokio::time::timeout(DEADLINE, get_status(addr))
        .await
        .map_err(|_| {
            anyhow::anyhow!("http://{addr}/healthz did not answer within {DEADLINE:?}")
        })??;
    if status != 200 {
        anyhow::bail!("http://{addr}/healthz answered {status}");
    }
    println!("ok");
    Ok(())
}

/// A wildcard listen address is reached on the loopback of the same family.
fn loopback_for(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

/// One HTTP/1.0 GET; the status code of the answer.
async fn get_status(addr: SocketAddr) -> anyhow::Result<u16> {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to {addr}: {e}"))?;
    stream
        .write_all(format!("GET /healthz HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut head = Vec::with_capacity(256);
    (&mut stream).take(4096).read_to_end(&mut head).await?;
    let text = String::from_utf8_lossy(&head);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("http://{addr}/healthz gave no HTTP status"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_becomes_loopback() {
        let a: SocketAddr = "0.0.0.0:9090".parse().unwrap();
        assert_eq!(loopback_for(a).to_string(), "127.0.0.1:9090");
        let a: SocketAddr = "[::]:9090".parse().unwrap();
        assert_eq!(loopback_for(a).to_string(), "[::1]:9090");
        let a: SocketAddr = "10.0.0.1:9090".parse().unwrap();
        assert_eq!(loopback_for(a), a);
    }
}
