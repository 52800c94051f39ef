//! `membrane-ca`: Membrane's controller binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use membrane_ca::SignerConfig;
use membrane_ca::app::{self, AppConfig, KubernetesMode, SourceMode};
use membrane_ca::serving::ListenerConfig;
use membrane_ca::status::StatusConfig;
use membrane_ca::tokenreview::TokenReviewConfig;
use membrane_runtime::cli::{HttpArgs, LogFormat, init_tracing};

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
    Serve(Box<ServeArgs>),
    /// Start a rotation of the self-managed root: creates the next root in the state
    /// directory; the running controller distributes it, switches signing once every
    /// connected ztunnel has it, and retires the old root when its last certificate expired.
    RotateRoot(RotateArgs),
}

#[derive(Debug, clap::Args)]
struct RotateArgs {
    /// The controller's state directory (where root-cert.pem lives).
    #[arg(
        long,
        env = "MEMBRANE_STATE_DIR",
        default_value = "/var/lib/membrane-ca"
    )]
    state_dir: PathBuf,
    /// Trust domain of the root.
    #[arg(long, env = "MEMBRANE_TRUST_DOMAIN", default_value = membrane_identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Lifetime of the new root.
    #[arg(long, default_value = "3650days", value_parser = humantime::parse_duration)]
    root_ttl: Duration,
}

fn rotate_root(args: RotateArgs) -> anyhow::Result<()> {
    let td = membrane_identity::spiffe_id::parse_trust_domain(&args.trust_domain)?;
    membrane_ca::rotation::request(&args.state_dir, &td, args.root_ttl).with_context(|| {
        format!(
            "cannot start a root rotation in {}",
            args.state_dir.display()
        )
    })?;
    let mut out = std::io::stdout().lock();
    use std::io::Write;
    writeln!(
        out,
        "root rotation started in {dir}: the running controller now distributes the new root,\nswitches signing once every connected ztunnel has acknowledged it (or after the running\ncontroller's --rotation-ack-timeout, listing the silent nodes as `unacknowledged`), and removes\nthe old root after the longest certificate lifetime. Follow it with the membrane_ca_root_rotation_phase metric\n(1 distributing, 2 signing with the new root, 0 done) or {dir}/rotation.json.",
        dir = args.state_dir.display()
    )?;
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Source {
    /// Manifests in `--source-dir`; nodes authenticate with `--tokens-file` bootstrap tokens.
    Directory,
    /// The Kubernetes API (in-cluster config or kubeconfig); nodes authenticate with their
    /// projected ServiceAccount token (TokenReview).
    Kubernetes,
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
    /// Where the cluster state comes from.
    #[arg(long, value_enum, env = "MEMBRANE_SOURCE", default_value = "directory")]
    source: Source,
    /// Directory of Kubernetes-style manifests (Namespaces, Pods, Services, policies) to
    /// authorize against; required with `--source directory`.
    #[arg(long, env = "MEMBRANE_SOURCE_DIR")]
    source_dir: Option<PathBuf>,
    /// How often the manifest directory is rescanned.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    reload_interval: Duration,
    /// Bootstrap token file: one `<node-name> <token>` per line; required with `--source
    /// directory`.
    #[arg(long, env = "MEMBRANE_TOKENS_FILE")]
    tokens_file: Option<PathBuf>,
    /// Audience the ztunnels' projected tokens are issued for (`--source kubernetes`).
    #[arg(long, env = "MEMBRANE_TOKEN_AUDIENCE", default_value = membrane_ca::tokenreview::DEFAULT_AUDIENCE)]
    token_audience: String,
    /// Service account (`namespace/name`) whose tokens identify ztunnels; repeatable
    /// (`--source kubernetes`).
    #[arg(
        long = "ztunnel-service-account",
        default_value = membrane_ca::tokenreview::DEFAULT_ZTUNNEL_ACCOUNT,
        value_parser = membrane_ca::tokenreview::parse_account
    )]
    ztunnel_service_accounts: Vec<(String, String)>,
    /// Service account (`namespace/name`) of gateway pods; repeatable (`--source
    /// kubernetes`). Its tokens authenticate a gateway pod's ztunnel in gateway mode, which may
    /// obtain only that account's identity, for a gateway pod on the token's node.
    #[arg(long = "gateway-service-account", value_parser = membrane_ca::tokenreview::parse_account)]
    gateway_service_accounts: Vec<(String, String)>,
    /// Namespace of the Lease that elects the replica writing policy status
    /// (`--source kubernetes`).
    #[arg(
        long,
        env = "MEMBRANE_STATUS_LEASE_NAMESPACE",
        default_value = membrane_ca::serving::CONTROLLER_NAMESPACE
    )]
    status_lease_namespace: String,
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
    /// Fraction of a workload certificate's lifetime after which ztunnels renew it (they add
    /// their own jitter).
    #[arg(long, default_value_t = membrane_ca::signer::DEFAULT_RENEWAL_FRACTION, value_parser = parse_fraction)]
    renewal_fraction: f64,
    /// During a root rotation, the least time the new root is distributed before signing
    /// switches to it (ztunnels that were connected before a controller restart reconnect
    /// and acknowledge within it).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    rotation_grace: Duration,
    /// During a root rotation, the longest wait for every connected ztunnel's acknowledgement
    /// of the new root (counted like --rotation-grace): past it, signing switches anyway and
    /// the nodes that did not acknowledge are reported, so a silent node cannot stall it.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    rotation_ack_timeout: Duration,
    /// The root namespace: AuthorizationPolicies without a selector in it apply to the whole
    /// mesh (streamed to the ztunnels). Set `istio-system` to enforce Istio's mesh-wide
    /// policies where they are.
    #[arg(long, default_value = membrane_policy::DEFAULT_ROOT_NAMESPACE)]
    root_namespace: String,
    /// The networks pod addresses are allocated from (comma-separated CIDRs, e.g. the
    /// cluster's pod CIDRs): a pod address outside all of them is published for no pod
    /// (`membrane_ca_discovery_withheld_pod_ips{reason="outside_pod_networks"}`), so a node
    /// cannot claim an outside address for a pod of its own. Unset: not checked.
    #[arg(long, env = "MEMBRANE_POD_NETWORKS", value_delimiter = ',', value_parser = parse_pod_network)]
    pod_networks: Vec<membrane_policy::IpNet>,
    /// Lifetime of a newly created self-managed root.
    #[arg(long, default_value = "3650days", value_parser = humantime::parse_duration)]
    root_ttl: Duration,
    /// Serve this trust domain's SPIFFE bundle endpoint (federation, `https_spiffe`
    /// profile) on this address; not served when unset.
    #[arg(long, env = "MEMBRANE_BUNDLE_ENDPOINT_LISTEN")]
    bundle_endpoint_listen: Option<SocketAddr>,
    /// Serve this cluster's exported Services (label `membrane.dev/export=true`) to
    /// federated controllers on this address (gRPC, mutual TLS with the controllers' SVIDs);
    /// not served when unset.
    #[arg(long, env = "MEMBRANE_FEDERATION_LISTEN")]
    federation_listen: Option<SocketAddr>,
    /// `spiffe_refresh_hint` the bundle endpoint gives federated peers.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    bundle_refresh_hint: Duration,
    /// Lifetime of the controller's own serving certificate (re-issued at every start).
    #[arg(long, default_value = "365days", value_parser = humantime::parse_duration)]
    serving_cert_ttl: Duration,
    /// gRPC connections held at once (TLS handshakes included); more are closed at once and
    /// counted in `membrane_ca_listener_connections_refused_total`.
    #[arg(long, default_value_t = 1024)]
    grpc_max_connections: usize,
    /// gRPC connections one peer IP holds at once (checked before TLS).
    #[arg(long, default_value_t = 64)]
    grpc_max_connections_per_peer: usize,
    /// Bound on a gRPC connection's TLS handshake.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    tls_handshake_timeout: Duration,
    /// A gRPC connection on which no call authenticated within this long (no HTTP/2
    /// preface, or no call with an accepted node credential), or whose client sent nothing
    /// for this long (no answer to the server's 10 s keepalive PINGs), is closed.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    grpc_idle_timeout: Duration,
    #[command(flatten)]
    http: HttpArgs,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Key exchange of the controller's TLS: `pq-preferred` (X25519MLKEM768, then X25519 for
    /// clients without it), `pq-only` or `classical`.
    #[arg(long, env = "MEMBRANE_TLS_KX", default_value = "pq-preferred")]
    tls_kx: membrane_identity::KeyExchange,
}

/// One of `--pod-networks`: a network with its prefix length and no host bits (a bare
/// address, or `10.244.1.0/16`, is almost certainly a mistake that would withhold nearly
/// every pod). An IPv4-mapped network (`::ffff:10.0.0.0/104`) is taken as the IPv4 one.
fn parse_pod_network(s: &str) -> Result<membrane_policy::IpNet, String> {
    if !s.contains('/') {
        return Err(format!(
            "{s:?}: expected a network with its prefix length, e.g. 10.244.0.0/16"
        ));
    }
    let parsed = membrane_policy::IpNet::parse(s)?;
    let net = parsed.net;
    if parsed.host_bits_cleared {
        return Err(format!("{s:?} has host bits set: did you mean {net}?"));
    }
    Ok(net)
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if (0.05..=0.95).contains(&f) => Ok(f),
        _ => Err(format!("{s:?}: expected a number between 0.05 and 0.95")),
    }
}

fn main() -> anyhow::Result<()> {
    let args = match Cli::parse().command {
        Command::Serve(args) => *args,
        Command::RotateRoot(args) => return rotate_root(args),
    };
    let directory = args.source == Source::Directory;
    let missing = |flag: &str| {
        Cli::command().error(
            clap::error::ErrorKind::MissingRequiredArgument,
            format!("{flag} is required with --source directory"),
        )
    };
    let (source_dir, tokens_file) = match (args.source_dir, args.tokens_file) {
        (Some(dir), Some(tokens)) => (dir, tokens),
        (None, _) if directory => missing("--source-dir").exit(),
        (_, None) if directory => missing("--tokens-file").exit(),
        (dir, tokens) => (dir.unwrap_or_default(), tokens.unwrap_or_default()),
    };
    init_tracing(args.log_format);
    membrane_identity::set_key_exchange(args.tls_kx);
    tracing::info!(tls_kx = %args.tls_kx, "TLS key exchange");
    let config = AppConfig {
        trust_domain: membrane_identity::spiffe_id::parse_trust_domain(&args.trust_domain)?,
        state_dir: args.state_dir,
        plugin_ca_dir: args.plugin_ca_dir,
        root_ttl: args.root_ttl,
        source_dir,
        reload_interval: args.reload_interval,
        tokens_file,
        listen: args.listen,
        metrics_listen: args.metrics_listen,
        server_names: args.server_names,
        serving_cert_ttl: args.serving_cert_ttl,
        rotation_grace: args.rotation_grace,
        rotation_ack_timeout: args.rotation_ack_timeout,
        root_namespace: args.root_namespace,
        pod_networks: args.pod_networks,
        federation: membrane_ca::app::FederationConfig {
            bundle_endpoint: args.bundle_endpoint_listen,
            exports_listen: args.federation_listen,
            refresh_hint: args.bundle_refresh_hint,
        },
        signer: SignerConfig {
            default_ttl: args.default_ttl,
            max_ttl: args.max_ttl,
            renewal_fraction: args.renewal_fraction,
        },
        listeners: ListenerConfig {
            grpc_max_connections: args.grpc_max_connections,
            grpc_max_connections_per_peer: args.grpc_max_connections_per_peer,
            tls_handshake_timeout: args.tls_handshake_timeout,
            grpc_idle_timeout: args.grpc_idle_timeout,
            http_max_connections: args.http.http_max_connections,
            http_max_connections_per_peer: args.http.http_max_connections_per_peer,
            http: args.http.timeouts(),
        },
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?
        .block_on(async move {
            let mode = match args.source {
                Source::Directory => SourceMode::Directory,
                Source::Kubernetes => SourceMode::Kubernetes(Box::new(KubernetesMode {
                    client: kube::Client::try_default()
                        .await
                        .context("cannot configure the Kubernetes client")?,
                    token_review: TokenReviewConfig {
                        audience: args.token_audience,
                        ztunnel_accounts: args.ztunnel_service_accounts,
                        gateway_accounts: args.gateway_service_accounts,
                        ..TokenReviewConfig::default()
                    },
                    status: StatusConfig::new(args.status_lease_namespace),
                })),
            };
            let running = app::start_with(config, mode).await?;
            running
                .run_until(membrane_runtime::shutdown_signal())
                .await?;
            Ok(())
        })
}
