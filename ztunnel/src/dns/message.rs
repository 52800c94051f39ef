//! DNS messages as the capture sees them: what a pod asked, what to answer when the ztunnel
//! answers itself (errors, mesh Services), and what an upstream answer says (addresses, CNAME
//! chain, TTL) — all through `hickory-proto`, no wire parsing by hand.
//!
//! Pure functions of bytes and the mesh state: no sockets, no clocks. The fuzz target drives
//! [`parse_query`] and [`summarize_answer`] with arbitrary bytes.

use std::collections::HashMap;
use std::net::IpAddr;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{Name, RData, Record, RecordType};

/// CNAME hops followed from the asked name; a longer chain is cut there (what lies beyond
/// pins nothing). Resolvers give up far earlier (BIND follows 16 as well).
pub const MAX_CNAME_HOPS: usize = 16;
/// Addresses taken from one answer (for the record and the pins); the rest are left out.
pub const MAX_ANSWER_ADDRESSES: usize = 64;

/// TTL of answers the ztunnel gives for mesh Services (they follow the mesh state, which may
/// change at any time).
pub const LOCAL_TTL: u32 = 5;

/// The one question of a pod's query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// The message id.
    pub id: u16,
    /// The name, lower-case, without the trailing dot.
    pub name: String,
    /// The type, as DNS prints it (`A`, `AAAA`, …).
    pub qtype: RecordType,
    /// The parsed message (for answering locally).
    pub message: Message,
}

/// Why a query is refused before it goes anywhere; each maps to the response the pod gets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// Not a DNS message, or not a query: FORMERR when an id could be read, else no answer.
    #[error("malformed query: {reason}")]
    Malformed {
        /// The message id, when the header could be read.
        id: Option<u16>,
        /// What is wrong.
        reason: String,
    },
    /// An opcode other than QUERY (NOTIFY, UPDATE, …): NOTIMP.
    #[error("opcode {op} not implemented")]
    NotImplemented {
        /// The message id.
        id: u16,
        /// The opcode.
        op: String,
    },
}

impl QueryError {
    /// The response to send the pod, if any.
    pub fn response(&self) -> Option<Vec<u8>> {
        let (id, code) = match self {
            Self::Malformed { id: Some(id), .. } => (*id, ResponseCode::FormErr),
            Self::Malformed { id: None, .. } => return None,
            Self::NotImplemented { id, .. } => (*id, ResponseCode::NotImp),
        };
        Message::error_msg(id, OpCode::Query, code).to_vec().ok()
    }

    /// The rcode of [`Self::response`], for records and metrics.
    pub fn rcode(&self) -> &'static str {
        match self {
            Self::Malformed { .. } => "FORMERR",
            Self::NotImplemented { .. } => "NOTIMP",
        }
    }
}

/// Parses a pod's query: exactly one question, QR clear, opcode QUERY.
pub fn parse_query(bytes: &[u8]) -> Result<Question, QueryError> {
    let id = (bytes.len() >= 12).then(|| u16::from_be_bytes([bytes[0], bytes[1]]));
    let malformed = |reason: String| QueryError::Malformed { id, reason };
    let message = Message::from_vec(bytes).map_err(|e| malformed(e.to_string()))?;
    if message.metadata.message_type != MessageType::Query {
        return Err(malformed("a response, not a query".into()));
    }
    if message.metadata.op_code != OpCode::Query {
        return Err(QueryError::NotImplemented {
            id: message.metadata.id,
            op: format!("{:?}", message.metadata.op_code),
        });
    }
    let [query] = message.queries.as_slice() else {
        return Err(malformed(format!(
            "{} questions (exactly one is answered)",
            message.queries.len()
        )));
    };
    Ok(Question {
        id: message.metadata.id,
        name: display_name(&query.name),
        qtype: query.query_type,
        message: message.clone(),
    })
}

/// A name as records show it: lower-case ASCII (IDNs stay punycode), no trailing dot.
pub fn display_name(name: &Name) -> String {
    let mut text = name.to_lowercase().to_ascii();
    if text.len() > 1 && text.ends_with('.') {
        text.pop();
    }
    text
}

/// What an answer says, for the record and the pins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AnswerSummary {
    /// Response code, as DNS prints it.
    pub rcode: String,
    /// A and AAAA addresses reached from the question's name (through the CNAME chain; at
    /// most [`MAX_ANSWER_ADDRESSES`]).
    pub addresses: Vec<IpAddr>,
    /// The CNAME chain from the question's name (at most [`MAX_CNAME_HOPS`]).
    pub cnames: Vec<String>,
    /// The smallest TTL among the records used.
    pub ttl: Option<u32>,
    /// The truncation bit.
    pub truncated: bool,
}

/// Why an upstream answer was not passed on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    /// Not a DNS message.
    #[error("unreadable answer: {0}")]
    Unreadable(String),
    /// An answer to another query (id or question differ).
    #[error("the answer does not match the query")]
    Mismatch,
}

/// Reads an upstream answer to `question`. Only records on the chain from the asked name
/// count: an address in the answer section under another owner name pins nothing.
pub fn summarize_answer(question: &Question, bytes: &[u8]) -> Result<AnswerSummary, AnswerError> {
    let message = Message::from_vec(bytes).map_err(|e| AnswerError::Unreadable(e.to_string()))?;
    if message.metadata.message_type != MessageType::Response || message.metadata.id != question.id
    {
        return Err(AnswerError::Mismatch);
    }
    match message.queries.as_slice() {
        [q] if display_name(&q.name) == question.name && q.query_type == question.qtype => {}
        // Some servers leave the question out of error answers.
        [] if message.answers.is_empty() => {}
        _ => return Err(AnswerError::Mismatch),
    }
    Ok(summarize(&question.name, &message))
}

fn summarize(asked: &str, message: &Message) -> AnswerSummary {
    let mut summary = AnswerSummary {
        rcode: rcode_name(message.metadata.response_code),
        truncated: message.metadata.truncation,
        ..AnswerSummary::default()
    };
    // Each record's owner, once; each owner's first CNAME.
    let owners: Vec<String> = message
        .answers
        .iter()
        .map(|r| display_name(&r.name))
        .collect();
    let mut targets: HashMap<&str, (&Record, &Name)> = HashMap::new();
    for (owner, record) in owners.iter().zip(&message.answers) {
        if let RData::CNAME(target) = &record.data {
            targets.entry(owner.as_str()).or_insert((record, &target.0));
        }
    }
    // Follow the chain, no loops, at most MAX_CNAME_HOPS hops.
    let mut owner = asked.to_owned();
    while let Some((record, target)) = targets.get(owner.as_str()) {
        let target = display_name(target);
        if summary.cnames.contains(&target) || target == asked {
            break;
        }
        if summary.cnames.len() == MAX_CNAME_HOPS {
            tracing::debug!(
                name = asked,
                hops = MAX_CNAME_HOPS,
                "CNAME chain cut: what lies beyond pins nothing"
            );
            break;
        }
        summary.ttl = Some(summary.ttl.map_or(record.ttl, |t| t.min(record.ttl)));
        summary.cnames.push(target.clone());
        owner = target;
    }
    let mut addresses = Vec::new();
    let mut ttl = summary.ttl;
    for (owner, record) in owners.iter().zip(&message.answers) {
        let ip = match &record.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(a) => IpAddr::V6(a.0),
            _ => continue,
        };
        if owner != asked && !summary.cnames.contains(owner) {
            continue;
        }
        if addresses.contains(&ip) {
            continue;
        }
        if addresses.len() == MAX_ANSWER_ADDRESSES {
            tracing::debug!(
                name = asked,
                kept = MAX_ANSWER_ADDRESSES,
                "answer with more addresses than are pinned: the rest are left out"
            );
            break;
        }
        ttl = Some(ttl.map_or(record.ttl, |t| t.min(record.ttl)));
        addresses.push(ip);
    }
    if ttl.is_none() {
        ttl = message.answers.iter().map(|r| r.ttl).min();
    }
    summary.addresses = addresses;
    summary.ttl = ttl;
    summary
}

/// A response code as DNS tools print it.
pub fn rcode_name(code: ResponseCode) -> String {
    match code {
        ResponseCode::NoError => "NOERROR".into(),
        ResponseCode::FormErr => "FORMERR".into(),
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::NXDomain => "NXDOMAIN".into(),
        ResponseCode::NotImp => "NOTIMP".into(),
        ResponseCode::Refused => "REFUSED".into(),
        other => format!("RCODE{}", u16::from(other)),
    }
}

/// A SERVFAIL for `question` (upstream unreachable or its answer unusable).
pub fn servfail(question: &Question) -> Vec<u8> {
    let mut message = question.message.clone().into_response();
    message.metadata.response_code = ResponseCode::ServFail;
    message.metadata.recursion_available = true;
    message.answers.clear();
    message.authorities.clear();
    message.additionals.clear();
    message.edns = None;
    message.signature = None;
    message
        .to_vec()
        .unwrap_or_else(|_| header_only(question.id, ResponseCode::ServFail))
}

/// The answer for a mesh Service's name: its virtual addresses of the asked family (an
/// empty NOERROR for the other family and for other types, as kube-dns answers).
pub fn local_answer(question: &Question, vips: &[IpAddr]) -> (Vec<u8>, AnswerSummary) {
    let mut message = question.message.clone().into_response();
    message.metadata.authoritative = true;
    message.metadata.recursion_available = true;
    message.metadata.response_code = ResponseCode::NoError;
    message.answers.clear();
    message.authorities.clear();
    message.additionals.clear();
    message.edns = None;
    message.signature = None;
    let owner = question
        .message
        .queries
        .first()
        .map(|q| q.name.clone())
        .unwrap_or_default();
    let mut addresses = Vec::new();
    for ip in vips {
        let data = match (ip, question.qtype) {
            (IpAddr::V4(v4), RecordType::A) => RData::A(A(*v4)),
            (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(*v6)),
            _ => continue,
        };
        addresses.push(*ip);
        message.add_answer(Record::from_rdata(owner.clone(), LOCAL_TTL, data));
    }
    let bytes = message
        .to_vec()
        .unwrap_or_else(|_| header_only(question.id, ResponseCode::ServFail));
    let summary = AnswerSummary {
        rcode: "NOERROR".into(),
        ttl: (!addresses.is_empty()).then_some(LOCAL_TTL),
        addresses,
        ..AnswerSummary::default()
    };
    (bytes, summary)
}

/// A bare 12-byte response header (used only if encoding a full message failed).
fn header_only(id: u16, code: ResponseCode) -> Vec<u8> {
    let mut out = vec![0; 12];
    out[..2].copy_from_slice(&id.to_be_bytes());
    out[2] = 0x80;
    out[3] = 0x80 | (u16::from(code) as u8 & 0x0f);
    out
}

/// The mesh Service `(namespace, name)` a question names, for `cluster_domain`
/// (`<svc>.<ns>.svc.<cluster_domain>`); `None` for any other name.
pub fn service_name<'a>(name: &'a str, cluster_domain: &str) -> Option<(&'a str, &'a str)> {
    let rest = name.strip_suffix(cluster_domain)?.strip_suffix(".svc.")?;
    let (svc, ns) = rest.split_once('.')?;
    (!svc.is_empty() && !ns.is_empty() && !ns.contains('.')).then_some((ns, svc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::rdata::CNAME;

    fn query(name: &str, qtype: RecordType) -> Vec<u8> {
        let mut m = Message::new(0x4242, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).expect("name"), qtype));
        m.to_vec().expect("encodes")
    }

    fn rr(name: &str, ttl: u32, data: RData) -> Record {
        Record::from_rdata(Name::from_ascii(name).expect("name"), ttl, data)
    }

    #[test]
    fn a_query_is_read_with_its_name_lowered_and_without_the_dot() {
        let q = parse_query(&query("HuggingFace.CO.", RecordType::AAAA)).expect("query");
        assert_eq!(
            (q.id, q.name.as_str(), q.qtype),
            (0x4242, "huggingface.co", RecordType::AAAA)
        );
    }

    #[test]
    fn garbage_gets_formerr_when_an_id_can_be_read_and_nothing_otherwise() {
        let e = parse_query(&[0xab, 0xcd, 1, 0, 0, 9, 0, 0, 0, 0, 0, 0, 7]).expect_err("bad");
        let reply = Message::from_vec(&e.response().expect("formerr")).expect("parses");
        assert_eq!(reply.metadata.id, 0xabcd);
        assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
        assert_eq!(e.rcode(), "FORMERR");
        assert!(
            parse_query(&[1, 2, 3])
                .expect_err("short")
                .response()
                .is_none()
        );
        // A response is not a query; two questions are not answered.
        let mut answer = Message::from_vec(&query("a.example", RecordType::A)).expect("q");
        answer.metadata.message_type = MessageType::Response;
        assert!(parse_query(&answer.to_vec().expect("encodes")).is_err());
        let mut two = answer.clone();
        two.metadata.message_type = MessageType::Query;
        two.add_query(Query::query(
            Name::from_ascii("b.example").expect("n"),
            RecordType::A,
        ));
        assert!(parse_query(&two.to_vec().expect("encodes")).is_err());
    }

    #[test]
    fn the_cname_chain_and_its_addresses_are_followed_and_strays_ignored() {
        let q = parse_query(&query("cdn.hf.co", RecordType::A)).expect("query");
        let mut m = q.message.clone().into_response();
        m.add_answer(rr(
            "cdn.hf.co.",
            60,
            RData::CNAME(CNAME(Name::from_ascii("cdn-lb.hf.co.").expect("n"))),
        ));
        m.add_answer(rr(
            "cdn-lb.hf.co.",
            30,
            RData::A(A("198.51.100.11".parse().expect("ip"))),
        ));
        // An address under an unrelated owner must not be pinned to the asked name.
        m.add_answer(rr(
            "evil.example.",
            1,
            RData::A(A("203.0.113.9".parse().expect("ip"))),
        ));
        let s = summarize_answer(&q, &m.to_vec().expect("encodes")).expect("summary");
        assert_eq!(s.rcode, "NOERROR");
        assert_eq!(s.cnames, ["cdn-lb.hf.co"]);
        assert_eq!(
            s.addresses,
            ["198.51.100.11".parse::<IpAddr>().expect("ip")]
        );
        assert_eq!(s.ttl, Some(30));
    }

    #[test]
    fn a_cname_loop_ends() {
        let q = parse_query(&query("a.example", RecordType::A)).expect("query");
        let mut m = q.message.clone().into_response();
        let cname = |t: &str| RData::CNAME(CNAME(Name::from_ascii(t).expect("n")));
        m.add_answer(rr("a.example.", 60, cname("b.example.")));
        m.add_answer(rr("b.example.", 60, cname("a.example.")));
        let s = summarize_answer(&q, &m.to_vec().expect("encodes")).expect("summary");
        assert_eq!(s.cnames, ["b.example"]);
        assert!(s.addresses.is_empty());
    }

    #[test]
    fn a_long_cname_chain_is_cut_at_the_cap() {
        let q = parse_query(&query("c0.example", RecordType::A)).expect("query");
        let mut m = q.message.clone().into_response();
        let hops = 3_500;
        for i in 0..hops {
            let target = Name::from_ascii(format!("c{}.example.", i + 1)).expect("n");
            m.add_answer(rr(
                &format!("c{i}.example."),
                60,
                RData::CNAME(CNAME(target)),
            ));
        }
        // Addresses at the chain's end and within the cap.
        m.add_answer(rr(
            &format!("c{hops}.example."),
            60,
            RData::A(A("198.51.100.66".parse().expect("ip"))),
        ));
        m.add_answer(rr(
            "c3.example.",
            60,
            RData::A(A("198.51.100.3".parse().expect("ip"))),
        ));
        for i in 0..200u8 {
            m.add_answer(rr(
                "c0.example.",
                60,
                RData::A(A(std::net::Ipv4Addr::new(203, 0, 113, i))),
            ));
        }
        let s = summarize(&q.name, &m);
        assert_eq!(s.cnames.len(), MAX_CNAME_HOPS);
        assert_eq!(s.cnames[0], "c1.example");
        assert_eq!(
            s.cnames[MAX_CNAME_HOPS - 1],
            format!("c{MAX_CNAME_HOPS}.example")
        );
        assert_eq!(s.addresses.len(), MAX_ANSWER_ADDRESSES);
        assert_eq!(
            s.addresses[0],
            "198.51.100.3".parse::<IpAddr>().expect("ip")
        );
        assert!(!s.addresses.contains(&"198.51.100.66".parse().expect("ip")));
    }

    #[test]
    fn answers_to_other_queries_are_refused() {
        let q = parse_query(&query("a.example", RecordType::A)).expect("query");
        let other = parse_query(&query("b.example", RecordType::A)).expect("query");
        let answer = other
            .message
            .clone()
            .into_response()
            .to_vec()
            .expect("encodes");
        assert_eq!(summarize_answer(&q, &answer), Err(AnswerError::Mismatch));
        assert!(matches!(
            summarize_answer(&q, b"nonsense"),
            Err(AnswerError::Unreadable(_))
        ));
    }

    #[test]
    fn servfail_and_local_answers_are_well_formed() {
        let q = parse_query(&query("web.shop.svc.cluster.local", RecordType::A)).expect("q");
        let fail = Message::from_vec(&servfail(&q)).expect("parses");
        assert_eq!(fail.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(fail.metadata.id, q.id);
        let vips: Vec<IpAddr> = vec![
            "10.96.0.5".parse().expect("ip"),
            "fd00::5".parse().expect("ip"),
        ];
        let (bytes, summary) = local_answer(&q, &vips);
        let m = Message::from_vec(&bytes).expect("parses");
        assert!(m.metadata.authoritative);
        assert_eq!(m.answers.len(), 1);
        assert_eq!(summary.addresses, vec![vips[0]]);
        assert_eq!(summary.ttl, Some(LOCAL_TTL));
    }

    #[test]
    fn only_full_service_names_of_the_cluster_domain_are_local() {
        let d = "cluster.local";
        assert_eq!(
            service_name("web.shop.svc.cluster.local", d),
            Some(("shop", "web"))
        );
        assert_eq!(service_name("web.shop.svc.cluster.local.evil", d), None);
        assert_eq!(service_name("a.b.shop.svc.cluster.local", d), None);
        assert_eq!(service_name("shop.svc.cluster.local", d), None);
        assert_eq!(service_name("huggingface.co", d), None);
    }
}
