//! Loopback addresses for child processes.
//!
//! tokenproxy itself binds port 0 and names the bound addresses in its
//! `listening` log line (see [`crate::support::child`]); third-party programs
//! that announce the port they bound (Prometheus, chromedriver) are read with
//! [`announced_port`]; only what cannot (the chaos suite's PostgreSQL cluster)
//! still gets a port picked here.

/// A loopback port that was free a moment ago (bound, then released): another
/// process may take it before the child binds it, so use it only where the child
/// cannot bind port 0 and say where it listens.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Reads a child's output line by line until one contains `marker`, and returns
/// the port written right after it: how a program started on port 0 says where
/// it listens. The rest of the output is drained in the background so the child
/// never blocks on a full pipe. Panics (naming `marker`) after 30 s.
#[allow(dead_code)]
pub async fn announced_port<R>(out: R, marker: &str) -> u16
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(out).lines();
    let found = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.ok().flatten() {
            if let Some((_, after)) = line.split_once(marker) {
                let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
                if let Ok(port) = digits.parse() {
                    return Some(port);
                }
            }
        }
        None
    })
    .await;
    let Ok(Some(port)) = found else {
        panic!("the child never announced `{marker}<port>` (30 s)");
    };
    let mut rest = lines.into_inner();
    tokio::spawn(async move { tokio::io::copy(&mut rest, &mut tokio::io::sink()).await });
    port
}

/// A TCP connection to `addr` from the loopback address `source` (127.0.0.2 is
/// another "client" to per-source limits), on an ephemeral port.
pub async fn connect_from(
    source: std::net::IpAddr,
    addr: std::net::SocketAddr,
) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(std::net::SocketAddr::new(source, 0)).unwrap();
    socket.connect(addr).await.unwrap()
}
