//! `membrane observe`: a live view of the connection records of a local mesh.
//!
//! Every ztunnel writes one JSON record per connection (both SPIFFE IDs, addresses, bytes,
//! duration, result, and on the destination side the authorization verdict with the deciding
//! policy); `membrane local` appends them to `<state-dir>/access.log`. This command prints
//! them as they arrive, optionally only those touching a namespace or an identity. Records
//! are parsed as `membrane_api::access::AccessRecord`, the type the ztunnel writes; a line
//! that is not one is skipped, and the skipped lines are counted in a warning.

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use membrane_api::access::{AccessRecord, KIND};

/// What to show.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only records whose source or destination identity is in one of these namespaces.
    pub namespaces: Vec<String>,
    /// Only records whose source or destination is this SPIFFE ID.
    pub identity: Option<String>,
}

fn namespace_of(id: &str) -> Option<&str> {
    let rest = id.split("/ns/").nth(1)?;
    rest.split('/').next()
}

impl Filter {
    /// Whether `record` passes.
    pub fn matches(&self, record: &AccessRecord) -> bool {
        let ids = [
            record.src_identity.as_deref(),
            record.dst_identity.as_deref(),
        ];
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
pub fn render(r: &AccessRecord) -> String {
    let verdict = match &r.authorization {
        Some(a) => match &a.policy {
            Some(p) => format!("{} by {p}", a.verdict),
            None => a.verdict.clone().into_owned(),
        },
        None => String::new(),
    };
    let reason = r
        .reason
        .as_deref()
        .map(|s| format!(" ({s})"))
        .unwrap_or_default();
    format!(
        "{} {:<8} {:<28} → {:<28} {:<6} {:<10} {:>8} B ↑ {:>8} B ↓ {:>6} ms  {}{}",
        r.start,
        r.direction,
        short(r.src_identity.as_deref()),
        short(r.dst_identity.as_deref()),
        r.transport,
        r.result,
        r.bytes_sent,
        r.bytes_received,
        r.duration_ms,
        verdict,
        reason
    )
}

/// Lines of the log that are not access records, counted for one warning at the end.
#[derive(Debug, Default)]
struct Skipped {
    lines: u64,
}

impl Skipped {
    /// Parses one line; `None` (and counted) if it is not an access record.
    fn parse(&mut self, line: &str) -> Option<AccessRecord> {
        match serde_json::from_str::<AccessRecord>(line) {
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
        if record.kind != KIND || !filter.matches(&record) {
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

    fn record() -> AccessRecord {
        Skipped::default().parse(INBOUND).expect("an access record")
    }

    #[test]
    fn filters_by_namespace_and_identity() {
        let r = record();
        assert!(Filter::default().matches(&r));
        let ns = |n: &str| Filter {
            namespaces: vec![n.into()],
            identity: None,
        };
        assert!(ns("inference").matches(&r) && ns("untrusted").matches(&r));
        assert!(!ns("data").matches(&r));
        let id = Filter {
            namespaces: vec![],
            identity: Some("spiffe://cluster.local/ns/untrusted/sa/scraper".into()),
        };
        assert!(id.matches(&r));
        let other = Filter {
            namespaces: vec![],
            identity: Some("spiffe://cluster.local/ns/a/sa/x".into()),
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
