//! A simulated outside world for tests, the demo and `membrane local`: a network namespace
//! `<testbed id>-internet` on the testbed's fabric, routed from every node (no NAT, as a
//! cluster's egress is routed), serving the addresses of `198.51.100.0/24`:
//!
//! - an authoritative DNS server at [`RESOLVER`]:53 (UDP and TCP) for the names of
//!   [`zone::ZONE`] — `huggingface.co` (A, AAAA, TXT), `cdn.hf.co` (a CNAME to
//!   `cdn-lb.hf.co`), `paste.example`, `s3.example` (two A records, TTL 5 s),
//!   `models.shared.example` and `uploads.shared.example` (one shared address) —, `big.example`
//!   (40 A records: truncated over UDP without EDNS) and `n<i>.flood.example` (100.64.0.0 + i);
//!   other names of its zones are NXDOMAIN, names outside them REFUSED;
//! - at each A address of the zone, `hello from <name> client=<ip>` (the address the
//!   connection came from) and an echo on TCP 80 and on TLS 443 (certificates from the
//!   world's own CA, [`World::ca_pem`]; the TLS greeting adds the SNI it received), a UDP echo on 443 of huggingface.co's addresses (IPv4 and [`HF6`]), and an upload sink on
//!   s3.example's first address (198.51.100.30), port [`SINK_PORT`] ([`World::sunk`]).
//!
//! Every other address of the /24 is local to the namespace and unserved (198.51.100.99 is a
//! resolver that refuses at once). The servers run on a thread of their own with their own
//! runtime, so sync and async callers alike can use the world; dropping it stops them (its
//! namespace goes with the testbed).

pub mod client;
pub mod dns_client;
mod servers;
pub mod zone;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;

use crate::netns::{Netns, Testbed, exec_in, run_in_netns};

/// The world's authoritative resolver.
pub const RESOLVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 53);
/// The internet namespace's address on the fabric.
pub const INTERNET_FABRIC_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 254);
/// The addresses the world owns.
pub const SERVED: &str = "198.51.100.0/24";
/// The IPv6 addresses the world owns (huggingface.co's AAAA among them).
pub const SERVED6: &str = "2001:db8:100::/64";

/// Each served address and the names its TLS certificate carries (the first greets).
const HOSTS: [(Ipv4Addr, &[&str]); 6] = [
    (Ipv4Addr::new(198, 51, 100, 10), &["huggingface.co"]),
    (
        Ipv4Addr::new(198, 51, 100, 11),
        &["cdn-lb.hf.co", "cdn.hf.co"],
    ),
    (Ipv4Addr::new(198, 51, 100, 20), &["paste.example"]),
    (Ipv4Addr::new(198, 51, 100, 30), &["s3.example"]),
    (Ipv4Addr::new(198, 51, 100, 31), &["s3.example"]),
    (
        Ipv4Addr::new(198, 51, 100, 40),
        &["models.shared.example", "uploads.shared.example"],
    ),
];

/// huggingface.co's IPv6 address (a UDP echo listens on its port 443 too).
pub const HF6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x10);

/// The upload sink: s3.example's first address, this port ([`World::sunk`] counts its bytes).
pub const SINK_PORT: u16 = 9000;

/// The running world.
pub struct World {
    netns: String,
    ca_pem: String,
    queries: Arc<AtomicU64>,
    sunk: Arc<AtomicU64>,
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("World")
            .field("netns", &self.netns)
            .finish_non_exhaustive()
    }
}

fn ip(netns: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut full = vec!["ip"];
    full.extend_from_slice(args);
    let out = exec_in(netns, &full)?;
    anyhow::ensure!(
        out.status.success(),
        "ip {} in {netns}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Bound sockets, created inside the internet namespace.
struct Sockets {
    dns_udp: std::net::UdpSocket,
    dns_tcp: std::net::TcpListener,
    hosts: Vec<(&'static str, std::net::TcpListener, std::net::TcpListener)>,
    quic: std::net::UdpSocket,
    quic6: std::net::UdpSocket,
    sink: std::net::TcpListener,
}

fn bind(netns: &str) -> anyhow::Result<Sockets> {
    let netns = netns.to_owned();
    run_in_netns(netns.netns_path(), || -> anyhow::Result<Sockets> {
        let tcp = |ip: Ipv4Addr, port| -> anyhow::Result<std::net::TcpListener> {
            let l =
                std::net::TcpListener::bind((ip, port)).with_context(|| format!("{ip}:{port}"))?;
            l.set_nonblocking(true)?;
            Ok(l)
        };
        let udp = |ip: Ipv4Addr, port| -> anyhow::Result<std::net::UdpSocket> {
            let s =
                std::net::UdpSocket::bind((ip, port)).with_context(|| format!("{ip}:{port}"))?;
            s.set_nonblocking(true)?;
            Ok(s)
        };
        let mut hosts = Vec::new();
        for (addr, names) in HOSTS {
            hosts.push((names[0], tcp(addr, 80)?, tcp(addr, 443)?));
        }
        Ok(Sockets {
            dns_udp: udp(RESOLVER, 53)?,
            dns_tcp: tcp(RESOLVER, 53)?,
            hosts,
            quic: udp(HOSTS[0].0, 443)?,
            quic6: {
                let addr = SocketAddr::new(IpAddr::V6(HF6), 443);
                let s = std::net::UdpSocket::bind(addr).with_context(|| addr.to_string())?;
                s.set_nonblocking(true)?;
                s
            },
            sink: tcp(HOSTS[3].0, SINK_PORT)?,
        })
    })?
}

/// The world's CA and one server configuration per host.
fn tls_configs() -> anyhow::Result<(String, Vec<Arc<rustls::ServerConfig>>)> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Membrane test world CA");
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut configs = Vec::new();
    for (_, names) in HOSTS {
        let key = rcgen::KeyPair::generate()?;
        let params = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )?;
        let cert = params.signed_by(&key, &issuer)?;
        let der = rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|e| anyhow::anyhow!("key: {e}"))?;
        let config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], der)?;
        configs.push(Arc::new(config));
    }
    Ok((ca.pem(), configs))
}

impl World {
    /// Creates the internet namespace on `testbed`'s fabric, routes between it and every node
    /// (call it after the nodes are added), and starts the servers.
    pub fn start(testbed: &mut Testbed) -> anyhow::Result<World> {
        let netns = testbed.add_external("internet", INTERNET_FABRIC_IP)?;
        // The whole /24 is local here: every address answers, served or not.
        ip(&netns, &["addr", "add", SERVED, "dev", "lo"])?;
        ip(
            &netns,
            &["-6", "addr", "add", SERVED6, "dev", "lo", "nodad"],
        )?;
        // A /64 on lo is not local as a whole (unlike IPv4's /24): the served address is.
        ip(
            &netns,
            &[
                "-6",
                "addr",
                "add",
                &format!("{HF6}/128"),
                "dev",
                "lo",
                "nodad",
            ],
        )?;
        let internet = INTERNET_FABRIC_IP.to_string();
        let internet6 = crate::netns::external_ip6(INTERNET_FABRIC_IP).to_string();
        for node in testbed.nodes() {
            let (cidr, via) = (node.pod_cidr().to_string(), node.fabric_ip().to_string());
            ip(&netns, &["route", "add", &cidr, "via", &via])?;
            let (cidr6, via6) = (node.pod_cidr6(), node.fabric_ip6().to_string());
            ip(&netns, &["-6", "route", "add", &cidr6, "via", &via6])?;
            ip(
                node.netns_name(),
                &["route", "add", SERVED, "via", &internet],
            )?;
            ip(
                node.netns_name(),
                &["-6", "route", "add", SERVED6, "via", &internet6],
            )?;
        }
        let sockets = bind(&netns)?;
        let (ca_pem, configs) = tls_configs()?;
        let queries = Arc::new(AtomicU64::new(0));
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let counter = queries.clone();
        let sunk = Arc::new(AtomicU64::new(0));
        let sunk_counter = sunk.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("world".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::Error::from(e)));
                        return;
                    }
                };
                rt.block_on(async move {
                    let started = (|| -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
                        let mut tasks = vec![
                            tokio::spawn(servers::dns_udp(
                                tokio::net::UdpSocket::from_std(sockets.dns_udp)?,
                                counter.clone(),
                                stop_rx.clone(),
                            )),
                            tokio::spawn(servers::dns_tcp(
                                tokio::net::TcpListener::from_std(sockets.dns_tcp)?,
                                counter,
                                stop_rx.clone(),
                            )),
                            tokio::spawn(servers::udp_echo(
                                tokio::net::UdpSocket::from_std(sockets.quic)?,
                                stop_rx.clone(),
                            )),
                            tokio::spawn(servers::udp_echo(
                                tokio::net::UdpSocket::from_std(sockets.quic6)?,
                                stop_rx.clone(),
                            )),
                            tokio::spawn(servers::sink(
                                tokio::net::TcpListener::from_std(sockets.sink)?,
                                sunk_counter,
                                stop_rx.clone(),
                            )),
                        ];
                        for ((name, plain, tls), config) in sockets.hosts.into_iter().zip(configs) {
                            tasks.push(tokio::spawn(servers::tcp_hello(
                                tokio::net::TcpListener::from_std(plain)?,
                                name,
                                stop_rx.clone(),
                            )));
                            tasks.push(tokio::spawn(servers::tls_hello(
                                tokio::net::TcpListener::from_std(tls)?,
                                name,
                                config,
                                stop_rx.clone(),
                            )));
                        }
                        Ok(tasks)
                    })();
                    match started {
                        Ok(tasks) => {
                            let _ = ready_tx.send(Ok(()));
                            for t in tasks {
                                let _ = t.await;
                            }
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                });
            })?;
        ready_rx
            .recv()
            .context("the world's thread ended before starting")??;
        Ok(World {
            netns,
            ca_pem,
            queries,
            sunk,
            stop,
            thread: Some(thread),
        })
    }

    /// The authoritative resolver.
    pub fn resolver(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(RESOLVER), 53)
    }

    /// PEM of the CA that signed the TLS servers' certificates.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Bytes the upload sink received so far (all connections).
    pub fn sunk(&self) -> u64 {
        self.sunk.load(Ordering::Relaxed)
    }

    /// DNS queries answered so far (UDP and TCP).
    pub fn queries(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }

    /// The internet namespace's name.
    pub fn netns_name(&self) -> &str {
        &self.netns
    }

    /// The zone's records (without `big.example` and `flood.example`).
    pub fn zone() -> &'static [zone::Entry] {
        zone::ZONE
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
