//! `membrane observe`: a live view of the connection records of a local mesh.
//!
//! Every ztunnel writes one JSON record per connection (both SPIFFE IDs, addresses, bytes,
//! duration, result, and on the destination side the authorization verdict with the deciding
//! policy); `membrane local` appends them to `<state-dir>/access.log`. This command prints
//! them as they arrive, optionally only those touching a namespace or an identity.

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;

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
    pub fn matches(&self, record: &Value) -> bool {
        let ids = [
            record["src_identity"].as_str(),
            record["dst_identity"].as_str(),
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
pub fn render(r: &Value) -> String {
    let verdict = match r["authorization"]["verdict"].as_str() {
        Some(v) => match r["authorization"]["policy"].as_str() {
            Some(p) => format!("{v} by {p}"),
            None => v.to_owned(),
        },
        None => String::new(),
    };
    let reason = r["reason"]
        .as_str()
        .map(|s| format!(" ({s})"))
        .unwrap_or_default();
    format!(
        "{} {:<8} {:<28} → {:<28} {:<6} {:<10} {:>8} B ↑ {:>8} B ↓ {:>6} ms  {}{}",
        r["start"].as_str().unwrap_or("?"),
        r["direction"].as_str().unwrap_or("?"),
        short(r["src_identity"].as_str()),
        short(r["dst_identity"].as_str()),
        r["transport"].as_str().unwrap_or("?"),
        r["result"].as_str().unwrap_or("?"),
        r["bytes_sent"].as_u64().unwrap_or(0),
        r["bytes_received"].as_u64().unwrap_or(0),
        r["duration_ms"].as_u64().unwrap_or(0),
        verdict,
        reason
    )
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
        let Ok(record) = serde_json::from_str::<Value>(line.trim_end()) else {
            continue;
        };
        if record["kind"] != "access" || !filter.matches(&record) {
            continue;
        }
        if json {
            println!("{record}");
        } else {
            println!("{}", render(&record));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(src: &str, dst: &str) -> Value {
        json!({"kind": "access", "src_identity": src, "dst_identity": dst, "direction": "inbound",
               "authorization": {"verdict": "deny", "policy": "inference/only-trainer"}})
    }

    #[test]
    fn filters_by_namespace_and_identity() {
        let r = record(
            "spiffe://cluster.local/ns/untrusted/sa/scraper",
            "spiffe://cluster.local/ns/inference/sa/model-server",
        );
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
        assert!(render(&r).contains("deny by inference/only-trainer"));
        assert!(render(&r).contains("untrusted/scraper"));
    }

    #[tokio::test]
    async fn prints_existing_records_without_follow() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("access.log");
        let line = record(
            "spiffe://cluster.local/ns/a/sa/x",
            "spiffe://cluster.local/ns/b/sa/y",
        );
        std::fs::write(&log, format!("{line}\nnot json\n{{\"partial\":")).expect("write");
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
