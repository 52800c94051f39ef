//! The DNS capture's sockets in one pod: a UDP socket and a TCP listener on
//! `127.0.0.1:15053` (and `[::1]:15053` when the pod has IPv6). The capture rules redirect
//! locally generated port-53 traffic to the loopback address, so binding there answers from
//! the address conntrack expects and nothing outside the pod can reach the port.
//!
//! At most [`super::DnsConfig::max_in_flight_per_pod`] queries of one pod are answered at once,
//! over UDP and TCP together; more are dropped and counted (over TCP with their connection).
//! UDP: each datagram is answered in its own task. TCP: length-prefixed messages (RFC 1035
//! §4.2.2) on connections held by the pod listener caps, each closed after [`TCP_IDLE`]
//! without a query or with an answer not taken, or after [`TCP_MAX_QUERIES`] queries.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use membrane_api::ports;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::Semaphore;

use super::upstream::{MAX_MESSAGE, read_framed, write_framed};
use super::{Asked, Dns};
use crate::netns::{Facing, PodNetns};
use crate::proxy::{DNS_TCP, PodContext, Proxy, original_dst, serve_listener};

/// A TCP connection without a query for this long is closed.
pub const TCP_IDLE: Duration = Duration::from_secs(10);
/// Queries answered on one TCP connection before it is closed.
pub const TCP_MAX_QUERIES: usize = 1000;

/// One pod's bound DNS sockets.
#[derive(Debug)]
pub struct DnsSockets {
    udp: Vec<UdpSocket>,
    tcp: Vec<TcpListener>,
}

/// Binds the pod's DNS sockets: IPv4 always, IPv6 when the namespace has `::1`.
pub async fn bind(netns: &PodNetns) -> std::io::Result<DnsSockets> {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, ports::DNS));
    let mut sockets = DnsSockets {
        udp: vec![netns.bind_udp(v4)?],
        tcp: vec![netns.listen(v4, Facing::App).await?],
    };
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, ports::DNS));
    match (netns.bind_udp(v6), netns.listen(v6, Facing::App).await) {
        (Ok(udp), Ok(tcp)) => {
            sockets.udp.push(udp);
            sockets.tcp.push(tcp);
        }
        (Err(e), _) | (_, Err(e)) => {
            tracing::debug!(netns = %netns.path().display(), error = %e, "no IPv6 loopback in the pod; DNS capture on IPv4 only");
        }
    }
    Ok(sockets)
}

/// Spawns the accept loops of `sockets`; they end when the pod stops accepting.
pub fn spawn(
    sockets: DnsSockets,
    dns: &Arc<Dns>,
    pod: &Arc<PodContext>,
    proxy: &Arc<Proxy>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    // One budget for all of the pod's queries, over UDP and TCP, IPv4 and IPv6.
    let limit = Arc::new(Semaphore::new(dns.config.max_in_flight_per_pod.max(1)));
    for udp in sockets.udp {
        tasks.push(tokio::spawn(run_udp(
            Arc::new(udp),
            dns.clone(),
            pod.clone(),
            proxy.clone(),
            limit.clone(),
        )));
    }
    for tcp in sockets.tcp {
        let (dns, limit) = (dns.clone(), limit.clone());
        tasks.push(tokio::spawn(serve_listener(
            tcp,
            pod.clone(),
            proxy.clone(),
            DNS_TCP,
            move |stream, peer, pod, proxy| {
                let (dns, limit) = (dns.clone(), limit.clone());
                async move { serve_tcp(stream, peer, &dns, &pod, &proxy, &limit).await }
            },
        )));
    }
    tasks
}

async fn run_udp(
    socket: Arc<UdpSocket>,
    dns: Arc<Dns>,
    pod: Arc<PodContext>,
    proxy: Arc<Proxy>,
    limit: Arc<Semaphore>,
) {
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let (n, src) = tokio::select! {
            _ = pod.accepting.cancelled() => return,
            received = socket.recv_from(&mut buf) => match received {
                Ok(received) => received,
                Err(e) => {
                    tracing::debug!(error = %e, "DNS socket receive failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            dns.dropped();
            continue;
        };
        let query = buf[..n].to_vec();
        let (socket, dns, pod, proxy) = (socket.clone(), dns.clone(), pod.clone(), proxy.clone());
        let cancel = pod.cancel.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let asked = Asked {
                protocol: "udp",
                src,
                resolver: None,
            };
            tokio::select! {
                _ = cancel.cancelled() => {}
                reply = dns.answer(&pod, &proxy, &query, asked) => {
                    if let Some(reply) = reply
                        && let Err(e) = socket.send_to(&reply, src).await
                    {
                        tracing::debug!(%src, error = %e, "cannot send the DNS answer");
                    }
                }
            }
        });
    }
}

async fn serve_tcp(
    mut stream: tokio::net::TcpStream,
    peer: SocketAddr,
    dns: &Dns,
    pod: &PodContext,
    proxy: &Proxy,
    limit: &Semaphore,
) {
    let asked = Asked {
        protocol: "tcp",
        src: peer,
        resolver: original_dst(&stream, peer).ok(),
    };
    for _ in 0..TCP_MAX_QUERIES {
        let query = match tokio::time::timeout(TCP_IDLE, read_framed(&mut stream)).await {
            Ok(Ok(query)) => query,
            Ok(Err(_)) | Err(_) => return,
        };
        // Over the pod's in-flight budget the query is dropped, as over UDP, and so is the
        // connection (a TCP client retries on a new one).
        let Ok(_permit) = limit.try_acquire() else {
            dns.dropped();
            return;
        };
        let Some(reply) = dns.answer(pod, proxy, &query, asked).await else {
            return;
        };
        // The answer is taken within the idle timeout too, or the connection is closed (a
        // client that never reads would hold it and its budget).
        match tokio::time::timeout(TCP_IDLE, write_framed(&mut stream, &reply)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return,
        }
    }
}
