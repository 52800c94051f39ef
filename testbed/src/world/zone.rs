//! The simulated world's names, and the authoritative answers to queries for them, built
//! with `hickory-proto`. Pure: bytes in, bytes out.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, SOA, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};

/// What one name holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    /// An address (A or AAAA by its family).
    Addr(IpAddr),
    /// An alias.
    Cname(&'static str),
    /// A text record.
    Txt(&'static str),
}

/// One record of the zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Owner name (no trailing dot).
    pub name: &'static str,
    /// TTL, seconds.
    pub ttl: u32,
    /// Data.
    pub data: Data,
}

const fn v4(a: u8, b: u8, c: u8, d: u8) -> Data {
    Data::Addr(IpAddr::V4(Ipv4Addr::new(a, b, c, d)))
}

/// The zone, except `big.example` (40 addresses: [`BIG`]) and `n<i>.flood.example`
/// ([`flood_address`]).
pub const ZONE: &[Entry] = &[
    Entry {
        name: "huggingface.co",
        ttl: 300,
        data: v4(198, 51, 100, 10),
    },
    Entry {
        name: "huggingface.co",
        ttl: 300,
        data: Data::Addr(IpAddr::V6(Ipv6Addr::new(
            0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x10,
        ))),
    },
    Entry {
        name: "huggingface.co",
        ttl: 300,
        data: Data::Txt("membrane-test"),
    },
    Entry {
        name: "cdn.hf.co",
        ttl: 60,
        data: Data::Cname("cdn-lb.hf.co"),
    },
    Entry {
        name: "cdn-lb.hf.co",
        ttl: 60,
        data: v4(198, 51, 100, 11),
    },
    Entry {
        name: "paste.example",
        ttl: 300,
        data: v4(198, 51, 100, 20),
    },
    Entry {
        name: "models.shared.example",
        ttl: 300,
        data: v4(198, 51, 100, 40),
    },
    Entry {
        name: "uploads.shared.example",
        ttl: 300,
        data: v4(198, 51, 100, 40),
    },
    Entry {
        name: "s3.example",
        ttl: 5,
        data: v4(198, 51, 100, 30),
    },
    Entry {
        name: "s3.example",
        ttl: 5,
        data: v4(198, 51, 100, 31),
    },
];

/// `big.example`: this many A records from 198.51.100.100 on (over 512 bytes).
pub const BIG: u8 = 40;

/// The zones this server is authoritative for.
const ZONES: [&str; 3] = ["huggingface.co", "hf.co", "example"];

/// The address of `n<i>.flood.example`: 100.64.0.0 + i (i below 2^22).
pub fn flood_address(name: &str) -> Option<Ipv4Addr> {
    let i: u32 = name
        .strip_suffix(".flood.example")?
        .strip_prefix('n')?
        .parse()
        .ok()?;
    (i < 1 << 22).then(|| Ipv4Addr::from(0x6440_0000 + i))
}

fn data_of(name: &str) -> Vec<(u32, Data)> {
    let mut out: Vec<(u32, Data)> = ZONE
        .iter()
        .filter(|e| e.name == name)
        .map(|e| (e.ttl, e.data.clone()))
        .collect();
    if name == "big.example" {
        out.extend((0..BIG).map(|i| (60, v4(198, 51, 100, 100 + i))));
    }
    if let Some(ip) = flood_address(name) {
        out.push((300, Data::Addr(IpAddr::V4(ip))));
    }
    out
}

fn rdata(data: &Data) -> Option<RData> {
    Some(match data {
        Data::Addr(IpAddr::V4(ip)) => RData::A(A(*ip)),
        Data::Addr(IpAddr::V6(ip)) => RData::AAAA(AAAA(*ip)),
        Data::Cname(target) => RData::CNAME(CNAME(Name::from_ascii(format!("{target}.")).ok()?)),
        Data::Txt(text) => RData::TXT(TXT::new(vec![(*text).to_owned()])),
    })
}

fn matches(data: &Data, qtype: RecordType) -> bool {
    match data {
        Data::Addr(IpAddr::V4(_)) => qtype == RecordType::A,
        Data::Addr(IpAddr::V6(_)) => qtype == RecordType::AAAA,
        Data::Cname(_) => qtype == RecordType::CNAME,
        Data::Txt(_) => qtype == RecordType::TXT,
    }
}

fn soa(zone: &str) -> Option<Record> {
    let origin = Name::from_ascii(format!("{zone}.")).ok()?;
    let mname = Name::from_ascii(format!("ns.{zone}.")).ok()?;
    let rname = Name::from_ascii(format!("hostmaster.{zone}.")).ok()?;
    Some(Record::from_rdata(
        origin,
        60,
        RData::SOA(SOA::new(mname, rname, 1, 3600, 600, 86400, 60)),
    ))
}

/// The answer to `query`; `max_udp` is `Some(payload limit)` over UDP (a larger answer is
/// truncated: TC set, no records), `None` over TCP. `None` back: not even an id to answer.
pub fn answer(query: &[u8], max_udp: Option<usize>) -> Option<Vec<u8>> {
    let request = match Message::from_vec(query) {
        Ok(m) => m,
        Err(_) => {
            let id = u16::from_be_bytes([*query.first()?, *query.get(1)?]);
            return Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
                .to_vec()
                .ok();
        }
    };
    let id = request.metadata.id;
    let (Some(q), MessageType::Query) = (request.queries.first(), request.metadata.message_type)
    else {
        return Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
            .to_vec()
            .ok();
    };
    let mut reply = Message::response(id, OpCode::Query);
    reply.metadata.authoritative = true;
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.add_query(q.clone());
    let asked = q.name.to_lowercase().to_ascii();
    let asked = asked.trim_end_matches('.').to_owned();
    let Some(zone) = ZONES
        .iter()
        .find(|z| asked == **z || asked.ends_with(&format!(".{z}")))
    else {
        reply.metadata.authoritative = false;
        reply.metadata.response_code = ResponseCode::Refused;
        return reply.to_vec().ok();
    };
    // Follow CNAMEs inside the zone, as authoritative servers do.
    let mut owner = asked.clone();
    let mut found_any = false;
    for _ in 0..8 {
        let data = data_of(&owner);
        found_any |= !data.is_empty();
        let owner_name = Name::from_ascii(format!("{owner}.")).ok()?;
        let alias = data.iter().find_map(|(ttl, d)| match d {
            Data::Cname(t) if q.query_type != RecordType::CNAME => Some((*ttl, d.clone(), *t)),
            _ => None,
        });
        if let Some((ttl, d, target)) = alias {
            reply.add_answer(Record::from_rdata(owner_name, ttl, rdata(&d)?));
            owner = target.to_owned();
            continue;
        }
        for (ttl, d) in data.iter().filter(|(_, d)| matches(d, q.query_type)) {
            reply.add_answer(Record::from_rdata(owner_name.clone(), *ttl, rdata(d)?));
        }
        break;
    }
    if !found_any {
        reply.metadata.response_code = ResponseCode::NXDomain;
    }
    if reply.answers.is_empty() {
        reply.add_authority(soa(zone)?);
    }
    let bytes = reply.to_vec().ok()?;
    match max_udp {
        Some(limit) if bytes.len() > limit => {
            let mut cut = Message::response(id, OpCode::Query);
            cut.metadata.authoritative = true;
            cut.metadata.truncation = true;
            cut.add_query(q.clone());
            cut.to_vec().ok()
        }
        _ => Some(bytes),
    }
}

/// The UDP payload limit a query allows: its EDNS size (at least 512), else 512.
pub fn udp_limit(query: &[u8]) -> usize {
    Message::from_vec(query)
        .ok()
        .and_then(|m| m.edns.map(|e| usize::from(e.max_payload())))
        .map_or(512, |n| n.max(512))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;

    fn ask(name: &str, qtype: RecordType, limit: Option<usize>) -> Message {
        let mut m = Message::new(7, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(Name::from_ascii(name).expect("name"), qtype));
        let bytes = answer(&m.to_vec().expect("encodes"), limit).expect("answered");
        Message::from_vec(&bytes).expect("parses")
    }

    #[test]
    fn the_zone_answers_as_an_authoritative_server() {
        let m = ask("huggingface.co", RecordType::A, Some(512));
        assert_eq!(m.answers.len(), 1);
        assert_eq!(m.answers[0].ttl, 300);
        let m = ask("cdn.hf.co", RecordType::A, Some(512));
        assert_eq!(m.answers.len(), 2, "the CNAME and its target's address");
        assert_eq!(ask("s3.example", RecordType::A, None).answers.len(), 2);
        let nx = ask("nothing.example", RecordType::A, None);
        assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(nx.authorities.len(), 1);
        let empty = ask("paste.example", RecordType::AAAA, None);
        assert_eq!(
            (empty.metadata.response_code, empty.answers.len()),
            (ResponseCode::NoError, 0)
        );
        assert_eq!(
            ask("google.com", RecordType::A, None)
                .metadata
                .response_code,
            ResponseCode::Refused
        );
        let flood = ask("n70000.flood.example", RecordType::A, None);
        assert_eq!(
            flood.answers[0].data,
            RData::A(A(Ipv4Addr::from(0x6440_0000 + 70_000)))
        );
    }

    #[test]
    fn a_large_answer_is_truncated_over_udp_only() {
        let cut = ask("big.example", RecordType::A, Some(512));
        assert!(cut.metadata.truncation && cut.answers.is_empty());
        assert_eq!(
            ask("big.example", RecordType::A, None).answers.len(),
            usize::from(BIG)
        );
        assert_eq!(
            ask("big.example", RecordType::A, Some(4096)).answers.len(),
            usize::from(BIG)
        );
        assert!(answer(&[1], None).is_none());
        let formerr =
            Message::from_vec(&answer(&[0, 9, 1, 2, 3], None).expect("formerr")).expect("p");
        assert_eq!(formerr.metadata.response_code, ResponseCode::FormErr);
    }
}
