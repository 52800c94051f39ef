//! Metrics and access records.
//!
//! Metric names follow Istio's TCP metrics with the `membrane_` prefix and Istio's label names
//! (`reporter`, `source_principal`, `destination_principal`), so dashboards port. Each
//! connection also produces one JSON access record on stdout (logs go to stderr).

use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Labels of the TCP metrics.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TcpLabels {
    /// `source` (outbound side) or `destination` (inbound side).
    pub reporter: &'static str,
    /// Source SPIFFE ID, or `unknown`.
    pub source_principal: String,
    /// Destination SPIFFE ID, or `unknown`.
    pub destination_principal: String,
}

/// Connection metrics.
#[derive(Debug, Clone, Default)]
pub struct TcpMetrics {
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    sent: Family<TcpLabels, Counter>,
    received: Family<TcpLabels, Counter>,
    refused: Family<TcpLabels, Counter>,
    /// Access records dropped (queue full).
    pub access_dropped: Counter,
}

impl TcpMetrics {
    /// Registers the metrics.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "tcp_connections_opened",
            "TCP connections opened",
            m.opened.clone(),
        );
        registry.register(
            "tcp_connections_closed",
            "TCP connections closed",
            m.closed.clone(),
        );
        registry.register(
            "tcp_sent_bytes",
            "Bytes sent by the connection's source",
            m.sent.clone(),
        );
        registry.register(
            "tcp_received_bytes",
            "Bytes received by the connection's source",
            m.received.clone(),
        );
        registry.register(
            "access_records_dropped",
            "Access records dropped because stdout could not keep up",
            m.access_dropped.clone(),
        );
        registry.register(
            "tcp_connections_refused",
            "Connections refused (no identity, not local, unreachable, denied)",
            m.refused.clone(),
        );
        m
    }

    /// Counts an opened connection.
    pub fn opened(&self, labels: &TcpLabels) {
        self.opened.get_or_create(labels).inc();
    }

    /// Counts a refused connection.
    pub fn refused(&self, labels: &TcpLabels) {
        self.refused.get_or_create(labels).inc();
    }

    /// Counts a closed connection and its bytes.
    pub fn closed(&self, labels: &TcpLabels, sent: u64, received: u64) {
        self.closed.get_or_create(labels).inc();
        self.sent.get_or_create(labels).inc_by(sent);
        self.received.get_or_create(labels).inc_by(received);
    }
}

/// One connection's access record: its shape is a contract with the readers of the ztunnel's
/// output (`membrane observe`), defined in `membrane_api::access`.
pub use membrane_api::access::{AccessRecord, Authorization};

/// Formats a time as RFC 3339 (UTC, millisecond precision).
pub fn rfc3339(t: SystemTime) -> String {
    let d = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Records waiting for the writer before new ones are dropped (and counted).
pub const ACCESS_QUEUE: usize = 16 * 1024;
/// How long the writer collects records after the first one of a batch before writing them.
///
/// Connections never wake the writer except for the first record after a quiet period: at a
/// few thousand connections a second, a wake-up (and a write) per record cost more CPU than
/// the rest of the record's handling (measured: futex and the blocking-pool handoff of
/// `tokio::io::stdout` were ~15 % of the ztunnel's CPU per new connection).
pub const ACCESS_BATCH_WINDOW: Duration = Duration::from_millis(20);
/// Largest batch written at once.
const ACCESS_BATCH_BYTES: usize = 256 * 1024;

enum AccessMsg {
    Line(String),
    Flush(std::sync::mpsc::SyncSender<()>),
}

/// Access records as JSON lines on stdout. Connections hand records to a bounded queue; one
/// writer thread wakes for the first record after a quiet period, collects for
/// [`ACCESS_BATCH_WINDOW`], and writes the batch with one `write`. If stdout cannot keep up,
/// records are dropped and counted, never waited for.
#[derive(Debug, Clone)]
pub struct AccessLog {
    tx: std::sync::mpsc::SyncSender<AccessMsg>,
    dropped: Counter,
}

impl AccessLog {
    /// A log whose writer thread writes to stdout; `dropped` counts records lost to a full
    /// queue. The thread ends when every clone of the log is gone.
    pub fn stdout(dropped: Counter) -> std::io::Result<Self> {
        Self::to_writer(dropped, std::io::stdout)
    }

    fn to_writer<W: std::io::Write + 'static>(
        dropped: Counter,
        open: impl FnOnce() -> W + Send + 'static,
    ) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel(ACCESS_QUEUE);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_batches(&rx, &mut open()))?;
        Ok(Self { tx, dropped })
    }

    /// Emits one record (an access record, a DNS record: any JSON line of the stream).
    pub fn record<R: serde::Serialize>(&self, record: &R) {
        let Ok(line) = serde_json::to_string(record) else {
            return;
        };
        if self.tx.try_send(AccessMsg::Line(line)).is_err() {
            self.dropped.inc();
        }
    }

    /// Writes out every record emitted so far; waits at most `timeout` (shutdown calls it so
    /// the last connections' records are not lost with the process).
    pub fn flush(&self, timeout: Duration) -> bool {
        let (done_tx, done_rx) = std::sync::mpsc::sync_channel(1);
        let deadline = std::time::Instant::now() + timeout;
        let mut msg = AccessMsg::Flush(done_tx);
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(std::sync::mpsc::TrySendError::Full(back)) => {
                    if std::time::Instant::now() >= deadline {
                        return false;
                    }
                    msg = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(std::sync::mpsc::TrySendError::Disconnected(_)) => return false,
            }
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        done_rx.recv_timeout(left).is_ok()
    }
}

fn write_batches(rx: &std::sync::mpsc::Receiver<AccessMsg>, out: &mut impl std::io::Write) {
    let mut batch = String::new();
    let mut flushes = Vec::new();
    let mut warned = false;
    // Blocks only while there is nothing to write: one wake-up per batch, not per record.
    while let Ok(first) = rx.recv() {
        take(first, &mut batch, &mut flushes);
        if flushes.is_empty() {
            std::thread::sleep(ACCESS_BATCH_WINDOW);
        }
        loop {
            while batch.len() < ACCESS_BATCH_BYTES {
                match rx.try_recv() {
                    Ok(msg) => take(msg, &mut batch, &mut flushes),
                    Err(_) => break,
                }
            }
            if let Err(e) = out.write_all(batch.as_bytes()).and_then(|()| out.flush()) {
                // stdout is gone (closed pipe): keep draining so senders never block.
                if !warned {
                    tracing::warn!(error = %e, "cannot write access records to stdout");
                    warned = true;
                }
            }
            let full = batch.len() >= ACCESS_BATCH_BYTES;
            batch.clear();
            if !full {
                break;
            }
        }
        for done in flushes.drain(..) {
            let _ = done.try_send(());
        }
    }
}

fn take(msg: AccessMsg, batch: &mut String, flushes: &mut Vec<std::sync::mpsc::SyncSender<()>>) {
    match msg {
        AccessMsg::Line(line) => {
            batch.push_str(&line);
            batch.push('\n');
        }
        AccessMsg::Flush(done) => flushes.push(done),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(std::sync::Arc<std::sync::Mutex<(Vec<u8>, usize)>>);

    impl std::io::Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let mut inner = self.0.lock().expect("lock");
            inner.0.extend_from_slice(buf);
            inner.1 += 1;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn record(n: u64) -> AccessRecord {
        AccessRecord {
            kind: membrane_api::access::KIND.into(),
            start: rfc3339(SystemTime::UNIX_EPOCH),
            direction: "outbound".into(),
            src_addr: "10.0.0.1:1000".parse().expect("addr"),
            dst_addr: "10.0.0.2:80".parse().expect("addr"),
            src_identity: None,
            dst_identity: None,
            transport: "hbone".into(),
            bytes_sent: n,
            bytes_received: 0,
            duration_ms: 0,
            result: "closed".into(),
            reason: None,
            authorization: None,
            forwarded_for: None,
            egress: None,
        }
    }

    #[test]
    fn records_are_written_in_batches_and_flushed_on_request() {
        let out = Shared::default();
        let sink = out.clone();
        let log = AccessLog::to_writer(Counter::default(), move || sink).expect("writer");
        for n in 0..500 {
            log.record(&record(n));
        }
        assert!(log.flush(Duration::from_secs(5)), "flush acknowledged");
        let (bytes, writes) = out.0.lock().expect("lock").clone();
        let text = String::from_utf8(bytes).expect("utf-8");
        // Each line parses as the shared record type, as `membrane observe` reads it.
        let lines: Vec<AccessRecord> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("one access record per line"))
            .collect();
        assert_eq!(lines.len(), 500);
        for (n, line) in lines.iter().enumerate() {
            assert_eq!(line, &record(n as u64), "in order, unchanged");
        }
        assert!(writes <= 5, "500 records in {writes} writes");
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        // A writer that never returns stands for a stdout nobody reads.
        struct Stuck;
        impl std::io::Write for Stuck {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                std::thread::sleep(Duration::from_secs(3600));
                Ok(0)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let dropped = Counter::default();
        let log = AccessLog::to_writer(dropped.clone(), || Stuck).expect("writer");
        let started = std::time::Instant::now();
        for n in 0..(ACCESS_QUEUE as u64 + 4096) {
            log.record(&record(n));
        }
        assert!(started.elapsed() < Duration::from_secs(10), "never blocks");
        assert!(dropped.get() > 0, "overflow counted");
        assert!(!log.flush(Duration::from_millis(100)), "flush gives up");
    }

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_694_400_123);
        assert_eq!(rfc3339(t), "2026-11-26T12:00:00.123Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }
}
