//! Command-line pieces shared by Membrane's binaries: the `--http-*` flags of their HTTP
//! listeners and the `--log-format` flag with the tracing setup it selects.
//!
//! Owns flag names, defaults and help texts so the binaries cannot drift apart; it must not
//! know which endpoints a binary serves on those listeners.

use std::time::Duration;

use crate::HttpTimeouts;

/// The `--http-*` flags of a binary's plain-HTTP listeners (whichever of metrics, readiness
/// and admin it serves); flattened into the binary's arguments with `#[command(flatten)]`.
#[derive(Debug, Clone, clap::Args)]
pub struct HttpArgs {
    /// Connections each plain-HTTP listener holds at once.
    #[arg(long, default_value_t = 1024)]
    pub http_max_connections: usize,
    /// Connections one peer IP holds at once on each plain-HTTP listener.
    #[arg(long, default_value_t = 8)]
    pub http_max_connections_per_peer: usize,
    /// Longest wait for a request's headers on a plain-HTTP listener.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub http_header_timeout: Duration,
    /// A plain-HTTP listener's connection idle this long is closed.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub http_idle_timeout: Duration,
}

impl HttpArgs {
    /// The header and idle timeouts.
    pub fn timeouts(&self) -> HttpTimeouts {
        HttpTimeouts {
            header: self.http_header_timeout,
            idle: self.http_idle_timeout,
        }
    }
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, the event's fields flattened into it.
    Json,
}

/// Installs the process's tracing subscriber: stderr, `format`, the filter from `RUST_LOG`
/// (default `info`). Call once, before anything logs.
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        http: HttpArgs,
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        let cli = Cli::try_parse_from(["bin"]).expect("defaults parse");
        assert_eq!(cli.http.http_max_connections, 1024);
        assert_eq!(cli.http.http_max_connections_per_peer, 8);
        assert_eq!(cli.http.timeouts(), HttpTimeouts::default());
        assert_eq!(cli.log_format, LogFormat::Text);
    }

    #[test]
    fn flags_parse() {
        let cli = Cli::try_parse_from([
            "bin",
            "--http-max-connections=5",
            "--http-max-connections-per-peer=2",
            "--http-header-timeout=3s",
            "--http-idle-timeout=1m",
            "--log-format=json",
        ])
        .expect("flags parse");
        assert_eq!(cli.http.http_max_connections, 5);
        assert_eq!(cli.http.http_max_connections_per_peer, 2);
        assert_eq!(cli.http.timeouts().header, Duration::from_secs(3));
        assert_eq!(cli.http.timeouts().idle, Duration::from_secs(60));
        assert_eq!(cli.log_format, LogFormat::Json);
        assert!(Cli::try_parse_from(["bin", "--http-idle-timeout=soon"]).is_err());
    }
}
