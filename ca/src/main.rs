//! `membrane-ca`: Membrane's controller binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use membrane_ca::metrics::{self, SignMetrics, SourceMetrics};
use membrane_ca::node_auth::BootstrapTokens;
use membrane_ca::server::{self, CertificateService};
use membrane_ca::source::directory::{self, DirectorySource};
use membrane_ca::{Signer, SignerConfig, SigningAuthority};
use tokio_util::sync::CancellationToken;

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
    #[arg(long, env = "MEMBRANE_STATE_DIR", default_value = "/var/lib/membrane-ca")]
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
    /// Prometheus metrics and readiness listen address.
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
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            init_tracing(args.log_format);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the runtime")?
                .block_on(serve(args))
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let trust_domain = membrane_identity::spiffe_id::parse_trust_domain(&args.trust_domain)?;
    anyhow::ensure!(
        !args.max_ttl.is_zero() && args.default_ttl <= args.max_ttl,
        "--default-ttl ({:?}) must be positive and at most --max-ttl ({:?})",
        args.default_ttl,
        args.max_ttl
    );
    let authority = match &args.plugin_ca_dir {
        Some(dir) => SigningAuthority::load_plugin(dir, &trust_domain)?,
        None => SigningAuthority::load_or_create(&args.state_dir, &trust_domain, args.root_ttl)?,
    };
    tracing::info!(
        trust_domain = %trust_domain,
        plugin = args.plugin_ca_dir.is_some(),
        roots = authority.bundle().roots().len(),
        signing_not_after = %authority.not_after(),
        "signing authority loaded"
    );
    let signer = Signer::new(
        authority,
        SignerConfig {
            default_ttl: args.default_ttl,
            max_ttl: args.max_ttl,
        },
    );
    let tokens = BootstrapTokens::load(&args.tokens_file)?;
    let identity = server::serving_identity(&signer, &args.server_names, args.serving_cert_ttl)?;

    let mut registry = metrics::registry();
    let sign_metrics = SignMetrics::register(&mut registry);
    let source_metrics = SourceMetrics::register(&mut registry);
    let registry = Arc::new(registry);

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let metrics_listener = metrics::bind(args.metrics_listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.metrics_listen))?;

    // One drain signal for the whole process; every task below is spawned here and watches it.
    let cancel = CancellationToken::new();
    let (state_tx, state_rx) = tokio::sync::watch::channel(None);
    let source_task = tokio::spawn(directory::run(
        DirectorySource::new(&args.source_dir),
        args.reload_interval,
        state_tx,
        source_metrics,
        cancel.clone(),
    ));
    let metrics_task = tokio::spawn(metrics::serve(
        metrics_listener,
        registry,
        state_rx.clone(),
        cancel.clone(),
    ));
    let service = CertificateService::new(signer, tokens, state_rx, sign_metrics);
    let grpc_task = tokio::spawn(server::serve(listener, service, identity, cancel.clone()));
    tracing::info!(
        listen = %args.listen,
        metrics = %args.metrics_listen,
        source = %args.source_dir.display(),
        "membrane-ca serving"
    );

    let mut grpc_task = grpc_task;
    tokio::select! {
        _ = shutdown_signal() => tracing::info!("shutting down"),
        result = &mut grpc_task => {
            cancel.cancel();
            return match result {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.into()),
                Err(e) => Err(anyhow::anyhow!("gRPC task failed: {e}")),
            };
        }
    }
    cancel.cancel();
    let drain = async {
        let _ = grpc_task.await;
        let _ = source_task.await;
        let _ = metrics_task.await;
    };
    if tokio::time::timeout(Duration::from_secs(10), drain).await.is_err() {
        tracing::warn!("drain deadline passed; stopping anyway");
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        // Without signal handlers the process can only be killed; wait forever.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
