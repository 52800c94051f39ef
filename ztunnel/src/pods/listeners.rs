//! The sockets of one enrolled pod: 15001, 15006 and 15008 on IPv4 and, when the pod's
//! namespace has IPv6, on IPv6 too (each family its own socket), and the DNS capture's
//! sockets on 15053. All are bound before the capture rules are installed, so captured
//! traffic never meets a closed port; the accept loops start only after.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use membrane_api::ports;
use tokio::net::TcpListener;

use super::EnrollError;
use crate::dns::Dns;
use crate::dns::server::{self as dns, DnsSockets};
use crate::netns::{Facing, PodNetns};
use crate::proxy::{PodContext, Proxy};
use crate::{inbound, outbound};

/// One pod's bound sockets.
#[derive(Debug)]
pub struct PodListeners {
    outbound: Vec<TcpListener>,
    plaintext: Vec<TcpListener>,
    hbone: Vec<TcpListener>,
    dns: DnsSockets,
}

/// Binds every socket of the pod in `netns`. IPv4 must work; IPv6 is bound when the
/// namespace has it (a pod without IPv6 has no IPv6 traffic to capture).
pub async fn bind(netns: &PodNetns) -> Result<PodListeners, EnrollError> {
    let v4 = |port| SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let listen = |addr: SocketAddr| async move {
        // The outbound listener's peers are the pod's application; the others' are remote,
        // and the HBONE listener's tunnels carry the ztunnel's mark (left untracked).
        let listening = match addr.port() {
            ports::OUTBOUND => netns.listen(addr, Facing::App).await,
            ports::HBONE => netns.listen_tunnel(addr).await,
            _ => netns.listen(addr, Facing::Network).await,
        };
        listening.map_err(|source| EnrollError::Listen {
            port: addr.port(),
            source,
        })
    };
    let mut bound = PodListeners {
        outbound: vec![listen(v4(ports::OUTBOUND)).await?],
        plaintext: vec![listen(v4(ports::INBOUND_PLAINTEXT)).await?],
        hbone: vec![listen(v4(ports::HBONE)).await?],
        dns: dns::bind(netns)
            .await
            .map_err(|source| EnrollError::Listen {
                port: ports::DNS,
                source,
            })?,
    };
    let v6 = |port| SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    let six = async {
        Ok::<_, EnrollError>((
            listen(v6(ports::OUTBOUND)).await?,
            listen(v6(ports::INBOUND_PLAINTEXT)).await?,
            listen(v6(ports::HBONE)).await?,
        ))
    };
    match six.await {
        Ok((o, p, h)) => {
            bound.outbound.push(o);
            bound.plaintext.push(p);
            bound.hbone.push(h);
        }
        Err(e) => {
            tracing::debug!(netns = %netns.path().display(), error = %e, "no IPv6 in the pod; capturing IPv4 only");
        }
    }
    Ok(bound)
}

/// Starts the accept loops of `bound` for `pod`.
pub fn spawn(
    bound: PodListeners,
    dns_capture: &Arc<Dns>,
    pod: &Arc<PodContext>,
    proxy: &Arc<Proxy>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for l in bound.outbound {
        tasks.push(tokio::spawn(outbound::run(l, pod.clone(), proxy.clone())));
    }
    for l in bound.plaintext {
        tasks.push(tokio::spawn(inbound::run_plaintext(
            l,
            pod.clone(),
            proxy.clone(),
        )));
    }
    for l in bound.hbone {
        tasks.push(tokio::spawn(inbound::run_hbone(
            l,
            pod.clone(),
            proxy.clone(),
        )));
    }
    tasks.extend(dns::spawn(bound.dns, dns_capture, pod, proxy));
    tasks
}
