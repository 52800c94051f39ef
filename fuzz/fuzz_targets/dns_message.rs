//! The DNS capture's parsers on pod- and upstream-controlled bytes: a query from a pod, an
//! answer from the upstream (the first byte gives the query's length; the rest is the
//! answer, checked against that query), and a TLS
//! ClientHello's server name. Never panics; a refused query's reply, when there is one, is a
//! well-formed DNS message carrying the query's id; a summary's addresses are unique.
#![no_main]

use hickory_proto::op::Message;
use libfuzzer_sys::fuzz_target;
use membrane_ztunnel::dns::message::{local_answer, parse_query, servfail, summarize_answer};
use membrane_ztunnel::sni::client_hello;

fuzz_target!(|data: &[u8]| {
    let _ = client_hello(data);
    let Some((&len, rest)) = data.split_first() else {
        return;
    };
    let (first, second) = rest.split_at(usize::from(len).min(rest.len()));
    match parse_query(first) {
        Ok(question) => {
            assert!(Message::from_vec(&servfail(&question)).is_ok());
            let (local, _) = local_answer(&question, &["10.96.0.1".parse().expect("ip")]);
            assert!(Message::from_vec(&local).is_ok());
            if let Ok(summary) = summarize_answer(&question, second) {
                let mut unique = summary.addresses.clone();
                unique.sort_unstable();
                unique.dedup();
                assert_eq!(unique.len(), summary.addresses.len());
            }
        }
        Err(e) => {
            if let Some(reply) = e.response() {
                let reply = Message::from_vec(&reply).expect("a FORMERR/NOTIMP parses");
                assert_eq!(reply.metadata.id, u16::from_be_bytes([first[0], first[1]]));
            }
        }
    }
});
