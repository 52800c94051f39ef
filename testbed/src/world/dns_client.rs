//! A DNS client for tests and the demo: queries sent from inside a pod's network namespace exactly as an
//! application there would send them (no ztunnel mark: they are captured), over UDP or TCP,
//! with `hickory-proto` messages.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};

/// How long a test waits for any answer.
pub const ANSWER_WAIT: Duration = Duration::from_secs(5);

/// A recursive query for `name` / `qtype` (id 0x4d42), with EDNS when `edns` (4096 bytes).
pub fn query(name: &str, qtype: RecordType, edns: bool) -> anyhow::Result<Vec<u8>> {
    let mut m = Message::new(0x4d42, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name)?, qtype));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(4096);
        m.set_edns(e);
    }
    Ok(m.to_vec()?)
}

/// Sends `bytes` over UDP from inside `netns` to `server`; the answer's bytes, or `None`
/// when nothing came back within `wait`.
pub fn udp_exchange(
    netns: &Path,
    server: SocketAddr,
    bytes: &[u8],
    wait: Duration,
) -> anyhow::Result<Option<Vec<u8>>> {
    let bytes = bytes.to_vec();
    crate::netns::run_in_netns(netns, move || -> anyhow::Result<Option<Vec<u8>>> {
        let any: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        }
        .parse()?;
        let socket = std::net::UdpSocket::bind(any)?;
        socket.set_read_timeout(Some(wait))?;
        socket.send_to(&bytes, server)?;
        let mut buf = vec![0u8; 65_535];
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                anyhow::ensure!(from == server, "answer from {from}, asked {server}");
                buf.truncate(n);
                Ok(Some(buf))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    })?
}

/// Sends `bytes` over TCP (length-prefixed) from inside `netns` to `server`.
pub fn tcp_exchange(netns: &Path, server: SocketAddr, bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    let bytes = bytes.to_vec();
    crate::netns::run_in_netns(netns, move || -> anyhow::Result<Vec<u8>> {
        let mut s = std::net::TcpStream::connect_timeout(&server, ANSWER_WAIT)?;
        s.set_read_timeout(Some(ANSWER_WAIT))?;
        let len = u16::try_from(bytes.len())?;
        s.write_all(&len.to_be_bytes())?;
        s.write_all(&bytes)?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len)?;
        let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut answer)?;
        Ok(answer)
    })?
}

/// Resolves over UDP from `netns`; the parsed answer (an error if none came).
pub fn resolve(
    netns: &Path,
    server: SocketAddr,
    name: &str,
    qtype: RecordType,
) -> anyhow::Result<Message> {
    let answer = udp_exchange(netns, server, &query(name, qtype, true)?, ANSWER_WAIT)?
        .ok_or_else(|| anyhow::anyhow!("no answer from {server} for {name} {qtype}"))?;
    Ok(Message::from_vec(&answer)?)
}

/// The A/AAAA addresses of an answer, as strings, sorted.
pub fn addresses(m: &Message) -> Vec<String> {
    let mut out: Vec<String> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            hickory_proto::rr::RData::A(a) => Some(a.0.to_string()),
            hickory_proto::rr::RData::AAAA(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect();
    out.sort();
    out
}
