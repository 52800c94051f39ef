//! The simulated world's servers: the authoritative DNS server (UDP and TCP on
//! [`super::RESOLVER`]:53) and, at each address of the zone, a TCP server on 80 and a TLS
//! server on 443 (a certificate for the address's names from the world's own CA) that greet
//! the client with a line naming the server (and, over TLS, the SNI it received) and then echo,
//! plus a UDP echo on 443 of huggingface.co's address (a QUIC stand-in). Every socket is
//! created inside the internet namespace by the caller and only served here; every loop is
//! bounded by the shutdown token and every connection by [`IDLE`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;

use super::zone;

/// A connection (or DNS-over-TCP client) idle this long is closed.
pub const IDLE: Duration = Duration::from_secs(30);
/// Connections each TCP server handles at once (more wait in the backlog).
const MAX_CONNECTIONS: usize = 256;

/// Waits until `stop` says so.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Answers DNS over UDP until stopped.
pub async fn dns_udp(socket: UdpSocket, queries: Arc<AtomicU64>, mut stop: watch::Receiver<bool>) {
    let mut buf = vec![0u8; 65_535];
    loop {
        let (n, from) = tokio::select! {
            () = stopped(&mut stop) => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(_) => continue,
            },
        };
        let query = &buf[..n];
        if let Some(reply) = zone::answer(query, Some(zone::udp_limit(query))) {
            queries.fetch_add(1, Ordering::Relaxed);
            let _ = socket.send_to(&reply, from).await;
        }
    }
}

/// Answers DNS over TCP until stopped.
pub async fn dns_tcp(listener: TcpListener, queries: Arc<AtomicU64>, stop: watch::Receiver<bool>) {
    serve(listener, stop, move |mut s| {
        let queries = queries.clone();
        async move {
            for _ in 0..1000 {
                let Ok(Ok(len)) = tokio::time::timeout(IDLE, s.read_u16()).await else {
                    return;
                };
                let mut query = vec![0u8; usize::from(len)];
                if s.read_exact(&mut query).await.is_err() {
                    return;
                }
                let Some(reply) = zone::answer(&query, None) else {
                    return;
                };
                queries.fetch_add(1, Ordering::Relaxed);
                let Ok(len) = u16::try_from(reply.len()) else {
                    return;
                };
                if s.write_all(&len.to_be_bytes()).await.is_err()
                    || s.write_all(&reply).await.is_err()
                {
                    return;
                }
            }
        }
    })
    .await;
}

/// Accepts on `listener` until stopped, each connection in its own task (at most
/// [`MAX_CONNECTIONS`] at once).
async fn serve<F, Fut>(listener: TcpListener, mut stop: watch::Receiver<bool>, handle: F)
where
    F: Fn(tokio::net::TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = tokio::select! {
            () = stopped(&mut stop) => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let connection = handle(stream);
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            tokio::select! {
                () = stopped(&mut stop) => {}
                () = connection => {}
            }
        });
    }
}

/// Writes `greeting`, then echoes until the client closes or is idle for [`IDLE`].
async fn greet_and_echo<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, greeting: String) {
    if s.write_all(greeting.as_bytes()).await.is_err() {
        return;
    }
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match tokio::time::timeout(IDLE, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            _ => {
                let _ = s.shutdown().await;
                return;
            }
        }
    }
}

/// The address a connection came from, as the greeting tells it (`?` if unknown).
fn client_ip(s: &tokio::net::TcpStream) -> String {
    s.peer_addr()
        .map_or_else(|_| "?".to_owned(), |a| a.ip().to_string())
}

/// The plain TCP server of `name`.
pub async fn tcp_hello(listener: TcpListener, name: &'static str, stop: watch::Receiver<bool>) {
    serve(listener, stop, move |s| {
        let client = client_ip(&s);
        greet_and_echo(s, format!("hello from {name} client={client}\n"))
    })
    .await;
}

/// The TLS server of `name`.
pub async fn tls_hello(
    listener: TcpListener,
    name: &'static str,
    config: Arc<rustls::ServerConfig>,
    stop: watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    serve(listener, stop, move |s| {
        let acceptor = acceptor.clone();
        async move {
            let client = client_ip(&s);
            let Ok(Ok(tls)) = tokio::time::timeout(IDLE, acceptor.accept(s)).await else {
                return;
            };
            let sni = tls.get_ref().1.server_name().unwrap_or("-").to_owned();
            greet_and_echo(
                tls,
                format!("hello from {name} sni={sni} client={client}\n"),
            )
            .await;
        }
    })
    .await;
}

/// Echoes UDP datagrams until stopped.
pub async fn udp_echo(socket: UdpSocket, mut stop: watch::Receiver<bool>) {
    let mut buf = vec![0u8; 65_535];
    loop {
        let (n, from): (usize, SocketAddr) = tokio::select! {
            () = stopped(&mut stop) => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(_) => continue,
            },
        };
        let _ = socket.send_to(&buf[..n], from).await;
    }
}

/// Reads and discards everything sent to it, adding the byte count to `sunk` (an upload
/// target whose count survives a reset connection).
pub async fn sink(listener: TcpListener, sunk: Arc<AtomicU64>, stop: watch::Receiver<bool>) {
    serve(listener, stop, move |mut s| {
        let sunk = sunk.clone();
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(Ok(n)) = tokio::time::timeout(IDLE, s.read(&mut buf)).await {
                if n == 0 {
                    break;
                }
                sunk.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            }
        }
    })
    .await;
}
