//! `membrane-ca`: Membrane's controller binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use membrane_ca::SignerConfig;
use membrane_ca::app::{self, AppConfig};

/// Membrane's controller: certificate authority and workload source.
#[derive(Debug, Parser)]
#[command(name = "membrane-ca", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controller.
    Serve(ServeArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Trust domain of every identity this controller issues.
    #[arg(long, env = "MEMBRANE_TRUST_DOMAIN", default_value = membrane_identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Directory for the self-managed root (created 0700 on first start).
    #[arg(
        long,
        env = "MEMBRANE_STATE_DIR",
        default_value = "/var/lib/membrane-ca"
    )]
    state_dir: PathBuf,
    /// Plug-in CA directory (ca-cert.pem, ca-key.pem, root-cert.pem, optional cert-chain.pem);
    /// replaces the self-managed root.
    #[arg(long, env = "MEMBRANE_PLUGIN_CA_DIR")]
    plugin_ca_dir: Option<PathBuf>,
    /// Directory of Kubernetes-style manifests (Namespaces, Pods) to authorize against.
    #[arg(long, env = "MEMBRANE_SOURCE_DIR")]
    source_dir: PathBuf,
    /// How often the manifest directory is rescanned.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    reload_interval: Duration,
    /// Bootstrap token file: one `<node-name> <token>` per line.
    #[arg(long, env = "MEMBRANE_TOKENS_FILE")]
    tokens_file: PathBuf,
    /// gRPC (TLS) listen address.
    #[arg(long, default_value = "127.0.0.1:15012")]
    listen: SocketAddr,
    /// Prometheus metrics (/metrics) and readiness (/ready) listen address.
    #[arg(long, default_value = "127.0.0.1:15014")]
    metrics_listen: SocketAddr,
    /// Extra DNS names or IPs for the controller's serving certificate.
    #[arg(long = "server-name")]
    server_names: Vec<String>,
    /// Workload certificate lifetime when a request asks for none.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    default_ttl: Duration,
    /// Longest workload certificate lifetime granted.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    max_ttl: Duration,
    /// Lifetime of a newly created self-managed root.
    #[arg(long, default_value = "3650days", value_parser = humantime::parse_duration)]
    root_ttl: Duration,
    /// Lifetime of the controller's own serving certificate (re-issued at every start).
    #[arg(long, default_value = "365days", value_parser = humantime::parse_duration)]
    serving_cert_ttl: Duration,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

fn init_tracing(format: LogFormat) {
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

fn main() -> anyhow::Result<()> {
    let Command::Serve(args) = Cli::parse().command;
    init_tracing(args.log_format);
    let config = AppConfig {
        trust_domain: membrane_identity::spiffe_id::parse_trust_domain(&args.trust_domain)?,
        state_dir: args.state_dir,
        plugin_ca_dir: args.plugin_ca_dir,
        root_ttl: args.root_ttl,
        source_dir: args.source_dir,
        reload_interval: args.reload_interval,
        tokens_file: args.tokens_file,
        listen: args.listen,
        metrics_listen: args.metrics_listen,
        server_names: args.server_names,
        serving_cert_ttl: args.serving_cert_ttl,
        signer: SignerConfig {
            default_ttl: args.default_ttl,
            max_ttl: args.max_ttl,
        },
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?
        .block_on(async move {
            let running = app::start(config).await?;
            running
                .run_until(membrane_runtime::shutdown_signal())
                .await?;
            Ok(())
        })
}
