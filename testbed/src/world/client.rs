//! Clients of the simulated outside world ([`World`]) run from inside mesh pods, clients *in*
//! the outside world (external callers of an ingress gateway), and the access records their
//! connections leave (tests and `membrane demo` use them).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::World;
use crate::mesh::Mesh;

/// Reads the hello line a world server writes first (5 s bound per byte).
pub async fn hello(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> anyhow::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 200 {
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut byte)).await??;
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    Ok(String::from_utf8(line)?)
}

/// A connection from the internet namespace, from its address `source` (any address of the
/// world's range, e.g. 198.51.100.77), to `dst` (5 s bound): an external client.
pub async fn connect_from_internet(
    world: &World,
    source: std::net::Ipv4Addr,
    dst: SocketAddr,
) -> anyhow::Result<tokio::net::TcpStream> {
    let path = std::path::Path::new(crate::netns::NETNS_RUN_DIR).join(world.netns_name());
    let socket = crate::netns::run_in_netns(path, move || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.bind(&SocketAddr::from((source, 0)).into())?;
        s.set_nonblocking(true)?;
        Ok::<_, std::io::Error>(std::net::TcpStream::from(s))
    })??;
    let socket = tokio::net::TcpSocket::from_std_stream(socket);
    Ok(tokio::time::timeout(Duration::from_secs(5), socket.connect(dst)).await??)
}

/// The first flight of a real TLS client asking for server `name` (a ClientHello).
pub fn client_hello(name: &str) -> anyhow::Result<Vec<u8>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let server = rustls_pki_types::ServerName::try_from(name.to_owned())?;
    let mut conn = rustls::ClientConnection::new(Arc::new(config), server)?;
    let mut out = Vec::new();
    conn.write_tls(&mut out)?;
    Ok(out)
}

/// Sends `bytes` from the internet address `source` to `dst` and returns what comes back, as
/// many bytes (5 s bound); an error when the connection is refused, reset or closed first.
pub async fn echo_from_internet(
    world: &World,
    source: std::net::Ipv4Addr,
    dst: SocketAddr,
    bytes: &[u8],
) -> anyhow::Result<Vec<u8>> {
    let mut s = connect_from_internet(world, source, dst).await?;
    s.write_all(bytes).await?;
    let mut got = vec![0u8; bytes.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got)).await??;
    Ok(got)
}

/// A TLS client trusting the world's CA.
pub fn tls_connector(world: &World) -> anyhow::Result<tokio_rustls::TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(world.ca_pem().as_bytes()) {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// Opens TLS from pod `pod` to `dst` with server name `sni` (an IP address: no SNI is sent).
pub async fn tls_open(
    mesh: &Mesh,
    pod: &str,
    world: &World,
    dst: SocketAddr,
    sni: &str,
) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = mesh.connect_from(pod, dst).await?;
    let name = match sni.parse::<IpAddr>() {
        Ok(ip) => rustls_pki_types::ServerName::IpAddress(ip.into()),
        Err(_) => rustls_pki_types::ServerName::try_from(sni.to_owned())?,
    };
    let tls = tokio::time::timeout(
        Duration::from_secs(5),
        tls_connector(world)?.connect(name, tcp),
    )
    .await??;
    Ok(tls)
}

/// The hello line of the TLS server at `dst`, reached from `pod` with server name `sni`.
pub async fn tls_hello(
    mesh: &Mesh,
    pod: &str,
    world: &World,
    dst: SocketAddr,
    sni: &str,
) -> anyhow::Result<String> {
    let mut tls = tls_open(mesh, pod, world, dst, sni).await?;
    let line = hello(&mut tls).await?;
    tls.shutdown().await?;
    Ok(line)
}

/// The hello line of the plain TCP server at `dst`, reached from `pod`.
pub async fn plain_hello(mesh: &Mesh, pod: &str, dst: SocketAddr) -> anyhow::Result<String> {
    let mut tcp = mesh.connect_from(pod, dst).await?;
    let line = hello(&mut tcp).await?;
    tcp.shutdown().await?;
    Ok(line)
}

/// The `n`th (1-based) access record of node `node` from `pod` to `dst` (5 s bound).
pub async fn egress_record(
    mesh: &Mesh,
    node: &str,
    pod: &str,
    dst: SocketAddr,
    n: usize,
) -> anyhow::Result<Value> {
    let src = mesh.ip(pod).to_string();
    let src6 = mesh.ip6(pod).to_string();
    let dst = dst.to_string();
    let z = &mesh.ztunnels[node];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let found: Vec<Value> = z
            .access_records()
            .into_iter()
            .filter(|r| {
                r["kind"] == "access"
                    && r["dst_addr"] == dst.as_str()
                    && r["src_addr"].as_str().is_some_and(|s| {
                        s.starts_with(&format!("{src}:")) || s.starts_with(&format!("[{src6}]:"))
                    })
            })
            .collect();
        if found.len() >= n {
            return Ok(found[n - 1].clone());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no record {n} from {pod} to {dst}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
