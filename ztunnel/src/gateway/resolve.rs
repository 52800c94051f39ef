//! The egress gateway's own resolution of the name in a CONNECT request: A and AAAA asked of
//! the gateway's upstream resolver from the gateway pod's network namespace (UDP, again over
//! TCP when truncated), answers read with the DNS capture's parser (only records on the CNAME
//! chain from the asked name count). The source's resolution is never used: the gateway pins
//! the name itself. [`CachingResolver`] keeps each answer for its TTL (at most an hour,
//! [`MAX_CACHED`] names), so a burst of connections to one name costs one resolution.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};

use crate::dns::message::{self, AnswerSummary};
use crate::dns::upstream::{self, UpstreamError};
use crate::netns::PodNetns;

/// Why a name could not be resolved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResolveError {
    /// The name is not a DNS name.
    #[error("{name:?} is not a DNS name")]
    BadName {
        /// The name.
        name: String,
    },
    /// The upstream did not answer.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The answer was unreadable or answered something else.
    #[error("answer for {name}: {reason}")]
    Answer {
        /// The name.
        name: String,
        /// What was wrong.
        reason: String,
    },
    /// No address (NXDOMAIN, NODATA or an error code).
    #[error("{name} has no address ({rcode})")]
    NoAddress {
        /// The name.
        name: String,
        /// The response code of the A query.
        rcode: String,
    },
}

impl ResolveError {
    /// A short label for metrics and records.
    pub fn label(&self) -> &'static str {
        match self {
            Self::BadName { .. } => "bad_name",
            Self::Upstream(e) => e.label(),
            Self::Answer { .. } => "bad_answer",
            Self::NoAddress { .. } => "no_address",
        }
    }
}

/// Where and how the gateway resolves.
#[derive(Debug, Clone, Copy)]
pub struct Resolver {
    /// The upstream resolver.
    pub upstream: SocketAddr,
    /// How long one query may take.
    pub timeout: Duration,
}

/// Addresses of a name and how long they may be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// A then AAAA addresses, in the upstream's order.
    pub addresses: Vec<IpAddr>,
    /// The smallest TTL among the records used (seconds).
    pub ttl: u32,
}

impl Resolver {
    /// Resolves `name` (A and AAAA, asked at once) from inside `netns`.
    pub async fn resolve(&self, netns: &PodNetns, name: &str) -> Result<Resolved, ResolveError> {
        let (a, aaaa) = tokio::join!(
            self.ask(netns, name, RecordType::A),
            self.ask(netns, name, RecordType::AAAA)
        );
        let a = a?;
        // A failed AAAA query does not hide the A answer.
        let aaaa = aaaa.unwrap_or_default();
        let mut addresses = a.addresses;
        addresses.extend(aaaa.addresses.iter().filter(|ip| ip.is_ipv6()));
        addresses.retain(|ip| !ip.is_unspecified());
        if addresses.is_empty() {
            return Err(ResolveError::NoAddress {
                name: name.to_owned(),
                rcode: a.rcode,
            });
        }
        let ttl = [a.ttl, aaaa.ttl].into_iter().flatten().min().unwrap_or(0);
        Ok(Resolved { addresses, ttl })
    }

    async fn ask(
        &self,
        netns: &PodNetns,
        name: &str,
        qtype: RecordType,
    ) -> Result<AnswerSummary, ResolveError> {
        let bytes = query(name, qtype)?;
        let question = message::parse_query(&bytes).map_err(|e| ResolveError::Answer {
            name: name.to_owned(),
            reason: e.to_string(),
        })?;
        let bad = |e: message::AnswerError| ResolveError::Answer {
            name: name.to_owned(),
            reason: e.to_string(),
        };
        let answer = upstream::udp(netns, self.upstream, &bytes, self.timeout).await?;
        let summary = message::summarize_answer(&question, &answer).map_err(bad)?;
        if !summary.truncated {
            return Ok(summary);
        }
        let answer = upstream::tcp(netns, self.upstream, &bytes, self.timeout).await?;
        message::summarize_answer(&question, &answer).map_err(bad)
    }
}

/// Names a [`CachingResolver`] keeps at most.
pub const MAX_CACHED: usize = 10_000;
/// Longest time an answer is kept, whatever its TTL.
pub const MAX_CACHE_TTL: u32 = 3600;

/// A [`Resolver`] that keeps answers for their TTL.
#[derive(Debug)]
pub struct CachingResolver {
    resolver: Resolver,
    cache: std::sync::Mutex<std::collections::HashMap<String, (Resolved, std::time::Instant)>>,
}

impl CachingResolver {
    /// Caches `resolver`'s answers.
    pub fn new(resolver: Resolver) -> Self {
        Self {
            resolver,
            cache: std::sync::Mutex::default(),
        }
    }

    /// `name`'s addresses: a live cached answer, else a fresh one (kept for its TTL).
    pub async fn resolve(&self, netns: &PodNetns, name: &str) -> Result<Resolved, ResolveError> {
        let now = std::time::Instant::now();
        if let Some((hit, _)) = crate::lock(&self.cache)
            .get(name)
            .filter(|(_, expires)| *expires > now)
        {
            return Ok(hit.clone());
        }
        let fresh = self.resolver.resolve(netns, name).await?;
        if fresh.ttl > 0 {
            let expires = now + Duration::from_secs(u64::from(fresh.ttl.min(MAX_CACHE_TTL)));
            let mut cache = crate::lock(&self.cache);
            if cache.len() >= MAX_CACHED {
                cache.retain(|_, (_, e)| *e > now);
                if cache.len() >= MAX_CACHED {
                    cache.clear();
                }
            }
            cache.insert(name.to_owned(), (fresh.clone(), expires));
        }
        Ok(fresh)
    }
}

/// A recursive query for `name` with a random id.
fn query(name: &str, qtype: RecordType) -> Result<Vec<u8>, ResolveError> {
    let bad = || ResolveError::BadName {
        name: name.to_owned(),
    };
    let mut m = Message::new(rand::random(), MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(
        Name::from_ascii(name).map_err(|_| bad())?,
        qtype,
    ));
    m.to_vec().map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_parse_back_as_one_question() {
        let bytes = query("HuggingFace.co", RecordType::AAAA).expect("query");
        let q = message::parse_query(&bytes).expect("parses");
        assert_eq!(q.name, "huggingface.co");
        assert_eq!(q.qtype, RecordType::AAAA);
    }
}

#[cfg(test)]
mod cache_tests {
    use super::*;
    use hickory_proto::op::ResponseCode;
    use hickory_proto::rr::{RData, Record, rdata};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A resolver on loopback answering every A query with 203.0.113.7 (TTL `ttl`), AAAA with
    /// nothing; counts the queries.
    async fn upstream(ttl: u32) -> (SocketAddr, Arc<AtomicUsize>) {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = socket.local_addr().expect("addr");
        let asked = Arc::new(AtomicUsize::new(0));
        let count = asked.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 512];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                count.fetch_add(1, Ordering::SeqCst);
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let mut answer =
                    Message::new(query.metadata.id, MessageType::Response, OpCode::Query);
                answer.metadata.response_code = ResponseCode::NoError;
                for q in &query.queries {
                    answer.add_query(q.clone());
                    if q.query_type == RecordType::A {
                        answer.add_answer(Record::from_rdata(
                            q.name.clone(),
                            ttl,
                            RData::A(rdata::A::new(203, 0, 113, 7)),
                        ));
                    }
                }
                let _ = socket
                    .send_to(&answer.to_vec().expect("encode"), from)
                    .await;
            }
        });
        (addr, asked)
    }

    #[tokio::test]
    async fn answers_are_kept_for_their_ttl_only() {
        let netns = PodNetns::own().expect("own namespace");
        for (ttl, queries_after_two) in [(300, 2), (0, 4)] {
            let (addr, asked) = upstream(ttl).await;
            let resolver = CachingResolver::new(Resolver {
                upstream: addr,
                timeout: Duration::from_secs(2),
            });
            for _ in 0..2 {
                let r = resolver
                    .resolve(&netns, "models.example")
                    .await
                    .expect("resolved");
                assert_eq!(r.addresses, [IpAddr::from([203, 0, 113, 7])]);
                assert_eq!(r.ttl, ttl);
            }
            // A and AAAA once when cached; again on every resolution with a zero TTL.
            assert_eq!(asked.load(Ordering::SeqCst), queries_after_two, "ttl {ttl}");
        }
    }
}
