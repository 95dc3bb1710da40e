//! Loopback addresses for child processes.
//!
//! tokenproxy itself binds port 0 and names the bound addresses in its
//! `listening` log line (see [`crate::support::child`]); only third-party
//! programs that cannot report their port (Prometheus, the README's script with
//! its fixed URLs) still get a port picked here.

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
