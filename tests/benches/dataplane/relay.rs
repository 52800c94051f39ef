//! The benchmark's ceiling: two plain TCP relays (no TLS, no HTTP/2, no policy, no records)
//! where the ztunnels sit, so a run can say how much of the mesh's cost is the topology every
//! node proxy has (two extra TCP hops, in-pod redirect, two more processes on the cores) and
//! how much is Membrane's own work.
//!
//! The client pod's outgoing connections to the benchmark's ports are redirected (nftables,
//! like the ztunnel's capture) to the outbound relay inside that pod; it reads the original
//! destination (`SO_ORIGINAL_DST`), connects to the inbound relay in the server pod and sends
//! the destination port first (two bytes, the relay's stand-in for CONNECT); the inbound relay
//! connects to the server pod's application. Both relays copy with 256 KiB buffers on a
//! single-threaded runtime (the ztunnel's worker count on this two-core machine).
//!
//! The relays are this benchmark's own executable started again inside the pods with
//! `MEMBRANE_BENCH_RELAY` set (see [`run_if_requested`]).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsFd;
use std::process::{Child, Stdio};

use anyhow::{Context, bail};
use membrane_tests::netns::{command_in, exec_in};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::wait_listening;

/// Where the outbound relay listens in the client pod (the redirect's target).
const OUTBOUND_PORT: u16 = 15101;
/// Where the inbound relay listens in the server pod.
const INBOUND_PORT: u16 = 15102;
/// Copy buffer per direction (the ztunnel's largest relay buffer).
const BUFFER: usize = 256 * 1024;
/// The environment variable that turns this executable into a relay.
const ROLE_VAR: &str = "MEMBRANE_BENCH_RELAY";
/// The nftables table holding the redirect in the client pod.
const TABLE: &str = "membrane-bench-relay";

/// The two relay processes and the redirect; dropping it stops both and removes the rules.
pub struct Relays {
    children: Vec<Child>,
    client_ns: String,
}

impl Relays {
    /// Starts both relays and redirects the client pod's connections to `server_ip` on
    /// `ports` through them.
    pub fn start(
        client_ns: &str,
        server_ns: &str,
        server_ip: Ipv4Addr,
        ports: &[u16],
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating the benchmark executable")?;
        let mut relays = Self {
            children: Vec::new(),
            client_ns: client_ns.to_owned(),
        };
        for (ns, role) in [
            (server_ns, format!("in:{server_ip}")),
            (client_ns, format!("out:{server_ip}")),
        ] {
            let child = command_in(ns, &exe)
                .env(ROLE_VAR, &role)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .with_context(|| format!("starting the {role} relay"))?;
            relays.children.push(child);
        }
        wait_listening(server_ns, INBOUND_PORT)?;
        wait_listening(client_ns, OUTBOUND_PORT)?;
        let ports = ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let rules = format!(
            "table ip {TABLE} {{\n chain output {{\n  type nat hook output priority -100;\n  \
             ip daddr {server_ip} tcp dport {{ {ports} }} redirect to :{OUTBOUND_PORT}\n }}\n}}\n"
        );
        let out = command_in(client_ns, "nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                if let Some(mut stdin) = child.stdin.take() {
                    std::io::Write::write_all(&mut stdin, rules.as_bytes())?;
                }
                child.wait_with_output()
            })
            .context("running nft in the client pod")?;
        if !out.status.success() {
            bail!(
                "installing the relay redirect: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(relays)
    }

    /// The relays' process ids (for their CPU time and memory).
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }
}

impl Drop for Relays {
    fn drop(&mut self) {
        let _ = exec_in(&self.client_ns, &["nft", "delete", "table", "ip", TABLE]);
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// If this process was started as a relay, runs it (until killed) and returns `true`.
pub fn run_if_requested() -> anyhow::Result<bool> {
    let Ok(role) = std::env::var(ROLE_VAR) else {
        return Ok(false);
    };
    let (kind, ip) = role
        .split_once(':')
        .with_context(|| format!("{ROLE_VAR}={role}: expected in:<ip> or out:<ip>"))?;
    let server_ip: Ipv4Addr = ip.parse().with_context(|| format!("{ROLE_VAR}={role}"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    match kind {
        "out" => rt.block_on(serve(OUTBOUND_PORT, move |s| outbound(s, server_ip)))?,
        "in" => rt.block_on(serve(INBOUND_PORT, move |s| inbound(s, server_ip)))?,
        other => bail!("{ROLE_VAR}: unknown role {other}"),
    }
    Ok(true)
}

async fn serve<F, Fut>(port: u16, handle: F) -> anyhow::Result<()>
where
    F: Fn(tokio::net::TcpStream) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<()>> + 'static,
{
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).await?;
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async move {
            loop {
                let (s, _) = listener.accept().await?;
                let _ = s.set_nodelay(true);
                tokio::task::spawn_local(handle(s));
            }
        })
        .await
}

async fn outbound(mut app: tokio::net::TcpStream, server_ip: Ipv4Addr) -> std::io::Result<()> {
    let sa = nix::sys::socket::getsockopt(&app.as_fd(), nix::sys::socket::sockopt::OriginalDst)
        .map_err(std::io::Error::from)?;
    let port = u16::from_be(sa.sin_port);
    let mut up = tokio::net::TcpStream::connect(SocketAddrV4::new(server_ip, INBOUND_PORT)).await?;
    up.set_nodelay(true)?;
    up.write_all(&port.to_be_bytes()).await?;
    tokio::io::copy_bidirectional_with_sizes(&mut app, &mut up, BUFFER, BUFFER).await?;
    Ok(())
}

async fn inbound(mut tunnel: tokio::net::TcpStream, server_ip: Ipv4Addr) -> std::io::Result<()> {
    let mut port = [0u8; 2];
    tunnel.read_exact(&mut port).await?;
    let dst = SocketAddr::from((server_ip, u16::from_be_bytes(port)));
    let mut app = tokio::net::TcpStream::connect(dst).await?;
    app.set_nodelay(true)?;
    tokio::io::copy_bidirectional_with_sizes(&mut tunnel, &mut app, BUFFER, BUFFER).await?;
    Ok(())
}
