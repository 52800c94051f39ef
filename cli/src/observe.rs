//! `membrane observe`: a live view of the connection and DNS records of a local mesh.
//!
//! Every ztunnel writes one JSON record per connection (both SPIFFE IDs, addresses, bytes,
//! duration, result, on the destination side the authorization verdict with the deciding
//! policy, and for connections leaving the mesh the name the pod resolved and the SNI) and
//! one per DNS query of an enrolled pod (its identity, the name, the answer);
//! `membrane local` appends them to `<state-dir>/access.log`. This command prints them as
//! they arrive, optionally only those touching a namespace, an identity or a name. Records
//! are parsed as `membrane_api::access::AccessRecord` and `membrane_api::dns::DnsRecord`,
//! the types the ztunnel writes; a line that is neither is skipped, and the skipped lines
//! are counted in a warning.

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use membrane_api::access::{AccessRecord, KIND};
use membrane_api::dns::DnsRecord;

/// One line of the log.
#[derive(Debug, Clone)]
pub enum Record {
    /// A connection.
    Access(AccessRecord),
    /// A DNS query.
    Dns(DnsRecord),
}

/// What to show.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only records whose source or destination identity is in one of these namespaces.
    pub namespaces: Vec<String>,
    /// Only records whose source or destination is this SPIFFE ID.
    pub identity: Option<String>,
    /// Only DNS records for this name (or a name under it) and connections to it (the name
    /// the pod resolved, or the SNI it sent).
    pub name: Option<String>,
}

/// Whether `candidate` is `want` or a name under it (`cdn.hf.co` is under `hf.co`).
fn name_matches(want: &str, candidate: &str) -> bool {
    let want = want.trim_end_matches('.').to_ascii_lowercase();
    candidate == want || candidate.ends_with(&format!(".{want}"))
}

fn namespace_of(id: &str) -> Option<&str> {
    let rest = id.split("/ns/").nth(1)?;
    rest.split('/').next()
}

impl Filter {
    /// Whether `record` passes.
    pub fn matches(&self, record: &Record) -> bool {
        let (ids, names): ([Option<&str>; 2], Vec<&str>) = match record {
            Record::Access(r) => (
                [r.src_identity.as_deref(), r.dst_identity.as_deref()],
                r.egress
                    .iter()
                    .flat_map(|e| std::iter::once(e.host.as_str()).chain(e.sni.as_deref()))
                    .collect(),
            ),
            Record::Dns(r) => (
                [r.src_identity.as_deref(), None],
                std::iter::once(r.qname.as_str())
                    .chain(r.cnames.iter().map(String::as_str))
                    .collect(),
            ),
        };
        if let Some(want) = &self.name
            && !names.iter().any(|n| name_matches(want, n))
        {
            return false;
        }
        if let Some(want) = &self.identity
            && !ids.iter().flatten().any(|id| id == want)
        {
            return false;
        }
        if !self.namespaces.is_empty() {
            let hit = ids
                .iter()
                .flatten()
                .filter_map(|id| namespace_of(id))
                .any(|ns| self.namespaces.iter().any(|n| n == ns));
            if !hit {
                return false;
            }
        }
        true
    }
}

fn short(id: Option<&str>) -> String {
    match id {
        Some(id) => match (namespace_of(id), id.rsplit("/sa/").next()) {
            (Some(ns), Some(sa)) if id.contains("/sa/") => format!("{ns}/{sa}"),
            _ => id.to_owned(),
        },
        None => "(no identity)".to_owned(),
    }
}

/// One line of text for a record.
pub fn render(record: &Record) -> String {
    match record {
        Record::Access(r) => render_access(r),
        Record::Dns(r) => render_dns(r),
    }
}

fn render_dns(r: &DnsRecord) -> String {
    let mut answer: Vec<String> = r.cnames.iter().map(|c| format!("→ {c}")).collect();
    answer.extend(r.answers.iter().map(ToString::to_string));
    let ttl = r.ttl.map(|t| format!(" ttl {t}s")).unwrap_or_default();
    let from = if r.local {
        " (mesh)".to_owned()
    } else {
        r.upstream_us
            .map(|us| format!(" ({:.1} ms upstream)", us as f64 / 1000.0))
            .unwrap_or_default()
    };
    let reason = r
        .reason
        .as_deref()
        .map(|s| format!(" ({s})"))
        .unwrap_or_default();
    format!(
        "{} {:<8} {:<28} ? {} {} {} {}{ttl}{from}{reason}",
        r.start,
        "dns",
        short(r.src_identity.as_deref()),
        r.qname,
        r.qtype,
        r.rcode,
        answer.join(" ")
    )
}

fn render_access(r: &AccessRecord) -> String {
    let verdict = match (&r.authorization, &r.egress) {
        (Some(a), _) => match &a.policy {
            Some(p) => format!("{} by {p}", a.verdict),
            None => a.verdict.clone().into_owned(),
        },
        // A connection leaving the mesh: the EgressPolicy decision.
        (None, Some(e)) if !e.verdict.is_empty() => match &e.policy {
            Some(p) => format!("egress {} ({}) by {p}", e.verdict, e.reason),
            None => format!("egress {} ({})", e.verdict, e.reason),
        },
        (None, _) => String::new(),
    };
    let reason = r
        .reason
        .as_deref()
        .map(|s| format!(" ({s})"))
        .unwrap_or_default();
    let destination = match &r.egress {
        Some(e) => match &e.sni {
            Some(sni) => format!("{} (sni {sni})", e.host),
            None => e.host.clone(),
        },
        None => short(r.dst_identity.as_deref()),
    };
    format!(
        "{} {:<8} {:<28} → {:<28} {:<6} {:<10} {:>8} B ↑ {:>8} B ↓ {:>6} ms  {}{}",
        r.start,
        r.direction,
        short(r.src_identity.as_deref()),
        destination,
        r.transport,
        r.result,
        r.bytes_sent,
        r.bytes_received,
        r.duration_ms,
        verdict,
        reason
    )
}

/// Lines of the log that are not records, counted for one warning at the end.
#[derive(Debug, Default)]
struct Skipped {
    lines: u64,
}

/// Parses one line as the record its `kind` names.
fn parse_line(line: &str) -> Result<Record, serde_json::Error> {
    #[derive(serde::Deserialize)]
    struct Kind<'a> {
        kind: &'a str,
    }
    let kind: Kind<'_> = serde_json::from_str(line)?;
    if kind.kind == membrane_api::dns::KIND {
        serde_json::from_str(line).map(Record::Dns)
    } else {
        serde_json::from_str(line).map(Record::Access)
    }
}

impl Skipped {
    /// Parses one line; `None` (and counted) if it is not a record.
    fn parse(&mut self, line: &str) -> Option<Record> {
        match parse_line(line) {
            Ok(record) => Some(record),
            Err(e) => {
                self.lines += 1;
                tracing::debug!(error = %e, "skipped a line that is not an access record");
                None
            }
        }
    }

    fn warn(&self, log: &Path) {
        if self.lines > 0 {
            eprintln!(
                "warning: skipped {} line(s) of {} that are not access records",
                self.lines,
                log.display()
            );
            tracing::warn!(
                skipped = self.lines,
                log = %log.display(),
                "lines that are not access records were skipped"
            );
        }
    }
}

/// Prints the records of `log` that pass `filter`; with `follow`, keeps printing new ones
/// until interrupted.
pub async fn run(log: &Path, filter: &Filter, follow: bool, json: bool) -> anyhow::Result<()> {
    let file = std::fs::File::open(log).with_context(|| {
        format!(
            "{} not found: is a local mesh running? (`membrane local up DIR`)",
            log.display()
        )
    })?;
    let mut reader = BufReader::new(file);
    let mut skipped = Skipped::default();
    let result = follow_log(&mut reader, &mut skipped, filter, follow, json).await;
    skipped.warn(log);
    result
}

async fn follow_log(
    reader: &mut BufReader<std::fs::File>,
    skipped: &mut Skipped,
    filter: &Filter,
    follow: bool,
    json: bool,
) -> anyhow::Result<()> {
    let mut line = String::new();
    let mut position = 0u64;
    loop {
        line.clear();
        let n = reader.read_line(&mut line)?;
        if n == 0 || !line.ends_with('\n') {
            if !follow {
                return Ok(());
            }
            // Partial line or end of file: wait for more, re-reading from the line start.
            reader.seek(SeekFrom::Start(position))?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return Ok(()),
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            continue;
        }
        position += n as u64;
        let text = line.trim_end();
        let Some(record) = skipped.parse(text) else {
            continue;
        };
        let known = match &record {
            Record::Access(r) => r.kind == KIND,
            Record::Dns(_) => true,
        };
        if !known || !filter.matches(&record) {
            continue;
        }
        if json {
            // The line as the ztunnel wrote it.
            println!("{text}");
        } else {
            println!("{}", render(&record));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A destination-side record, as the ztunnel writes it (field order and all).
    const INBOUND: &str = concat!(
        r#"{"kind":"access","start":"2026-11-26T12:00:00.123Z","direction":"inbound","#,
        r#""src_addr":"10.0.0.1:40000","dst_addr":"10.0.0.2:8080","#,
        r#""src_identity":"spiffe://cluster.local/ns/untrusted/sa/scraper","#,
        r#""dst_identity":"spiffe://cluster.local/ns/inference/sa/model-server","#,
        r#""transport":"hbone","bytes_sent":0,"bytes_received":0,"duration_ms":1,"#,
        r#""result":"refused","reason":"denied by policy","#,
        r#""authorization":{"verdict":"deny","policy":"inference/only-trainer","rule":null,"#,
        r#""audit":[],"dry_run":[]}}"#
    );

    /// A DNS record, as the ztunnel writes it.
    const DNS: &str = concat!(
        r#"{"kind":"dns","start":"2026-12-04T12:00:00.000Z","pod":"training/trainer-0","#,
        r#""src_addr":"10.77.1.2:53211","src_identity":"spiffe://cluster.local/ns/training/sa/trainer","#,
        r#""resolver":"192.0.2.53:53","protocol":"udp","qname":"cdn.hf.co","qtype":"A","#,
        r#""rcode":"NOERROR","answers":["198.51.100.11"],"cnames":["cdn-lb.hf.co"],"ttl":60,"#,
        r#""upstream_us":412,"local":false,"truncated":false,"pinned":1}"#
    );

    fn record() -> Record {
        Skipped::default().parse(INBOUND).expect("an access record")
    }

    #[test]
    fn egress_decisions_show_with_their_policy() {
        let line = concat!(
            r#"{"kind":"access","start":"2026-12-04T12:00:01.000Z","direction":"outbound","#,
            r#""src_addr":"10.77.1.10:40000","dst_addr":"198.51.100.20:443","#,
            r#""src_identity":"spiffe://cluster.local/ns/training/sa/trainer","dst_identity":null,"#,
            r#""transport":"passthrough","bytes_sent":0,"bytes_received":0,"duration_ms":0,"#,
            r#""result":"refused","reason":"egress denied: matched","#,
            r#""egress":{"host":"paste.example","sni":"paste.example","verdict":"deny","#,
            r#""reason":"matched","policy":"membrane-system/no-paste-sites","rule":0}}"#
        );
        let r = Skipped::default().parse(line).expect("an access record");
        let text = render(&r);
        assert!(text.contains("paste.example (sni paste.example)"), "{text}");
        assert!(
            text.contains("egress deny (matched) by membrane-system/no-paste-sites"),
            "{text}"
        );
    }

    #[test]
    fn dns_records_show_beside_connections_and_filter_by_name() {
        let dns = Skipped::default().parse(DNS).expect("a DNS record");
        let text = render(&dns);
        assert!(text.contains("training/trainer "), "{text}");
        assert!(
            text.contains("? cdn.hf.co A NOERROR → cdn-lb.hf.co 198.51.100.11 ttl 60s"),
            "{text}"
        );
        let by = |name: &str| Filter {
            name: Some(name.into()),
            ..Filter::default()
        };
        assert!(by("hf.co").matches(&dns) && by("cdn-lb.hf.co").matches(&dns));
        assert!(!by("huggingface.co").matches(&dns));
        assert!(
            !by("hf.co").matches(&record()),
            "a connection with no egress name"
        );
        let training = Filter {
            namespaces: vec!["training".into()],
            ..Filter::default()
        };
        assert!(training.matches(&dns));
    }

    #[test]
    fn filters_by_namespace_and_identity() {
        let r = record();
        assert!(Filter::default().matches(&r));
        let ns = |n: &str| Filter {
            namespaces: vec![n.into()],
            ..Filter::default()
        };
        assert!(ns("inference").matches(&r) && ns("untrusted").matches(&r));
        assert!(!ns("data").matches(&r));
        let id = Filter {
            identity: Some("spiffe://cluster.local/ns/untrusted/sa/scraper".into()),
            ..Filter::default()
        };
        assert!(id.matches(&r));
        let other = Filter {
            identity: Some("spiffe://cluster.local/ns/a/sa/x".into()),
            ..Filter::default()
        };
        assert!(!other.matches(&r));
        let text = render(&r);
        assert!(text.contains("deny by inference/only-trainer"), "{text}");
        assert!(text.contains("untrusted/scraper"), "{text}");
        assert!(text.contains("(denied by policy)"), "{text}");
    }

    #[test]
    fn lines_that_are_not_records_are_counted() {
        let mut skipped = Skipped::default();
        assert!(skipped.parse(INBOUND).is_some());
        for bad in ["not json", "{\"kind\":\"access\"}", "{\"partial\":"] {
            assert!(skipped.parse(bad).is_none(), "{bad}");
        }
        assert_eq!(skipped.lines, 3);
    }

    #[tokio::test]
    async fn prints_existing_records_without_follow() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("access.log");
        std::fs::write(&log, format!("{INBOUND}\nnot json\n{{\"partial\":")).expect("write");
        run(&log, &Filter::default(), false, true)
            .await
            .expect("runs");
        assert!(
            run(&dir.path().join("missing"), &Filter::default(), false, true)
                .await
                .is_err()
        );
    }
}
