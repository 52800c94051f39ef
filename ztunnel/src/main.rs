//! `ztunnel`: Membrane's node agent.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use membrane_runtime::cli::{HttpArgs, LogFormat, init_tracing};
use membrane_ztunnel::app::{self, DnsSettings, ListenerConfig, ZtunnelConfig};
use membrane_ztunnel::busy_poll::BusyPoll;
use membrane_ztunnel::certs::CaConfig;
use membrane_ztunnel::dns::DnsConfig;
use membrane_ztunnel::gateway::GatewayConfig;
use membrane_ztunnel::gateway::resolve::Resolver;
use membrane_ztunnel::state::GatewayKind;

/// Membrane's node agent: captures enrolled pods' traffic and tunnels it over mutual TLS.
#[derive(Debug, Parser)]
#[command(name = "ztunnel", version)]
struct Args {
    /// This node's name (as pods' spec.nodeName says).
    #[arg(long, env = "MEMBRANE_NODE_NAME")]
    node: String,
    /// Trust domain.
    #[arg(long, env = "MEMBRANE_TRUST_DOMAIN", default_value = membrane_identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Local mode: read workloads from this file (YAML/JSON) instead of the controller's
    /// discovery stream (the controller still signs certificates).
    #[arg(long, env = "MEMBRANE_WORKLOADS_FILE")]
    workloads_file: Option<PathBuf>,
    /// Local mode only: AuthorizationPolicy file (YAML; reloaded on change). Without it every
    /// authenticated connection is allowed.
    #[arg(long, env = "MEMBRANE_POLICY_FILE", requires = "workloads_file")]
    policy_file: Option<PathBuf>,
    /// Controller address.
    #[arg(
        long,
        env = "MEMBRANE_CA_ADDRESS",
        default_value = "https://127.0.0.1:15012"
    )]
    ca_address: String,
    /// PEM file with the roots that authenticate the controller (bootstrap bundle).
    #[arg(long, env = "MEMBRANE_CA_ROOT")]
    ca_root: PathBuf,
    /// Name the controller's certificate must carry.
    #[arg(long, default_value = "membrane-ca")]
    ca_server_name: String,
    /// File holding this node's credential: a bootstrap token, or (in Kubernetes) the
    /// projected ServiceAccount token, re-read before each call to the controller.
    #[arg(long, env = "MEMBRANE_TOKEN_FILE")]
    token_file: PathBuf,
    /// Requested workload certificate lifetime (0: the controller's default).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    cert_ttl: Duration,
    /// Enrollment socket.
    #[arg(long, default_value = "/var/run/membrane/ztunnel.sock")]
    enroll_socket: PathBuf,
    /// Directory where enrolled pods are remembered across restarts.
    #[arg(long, default_value = "/var/lib/membrane/ztunnel")]
    state_dir: PathBuf,
    /// Directory where the container runtime pins pods' network namespaces (containerd,
    /// CRI-O: /var/run/netns). When set, mesh pods of this node that nobody enrolled (pods
    /// that existed before Membrane) are found there by address and enrolled. Off by default.
    #[arg(long, env = "MEMBRANE_NETNS_DIR")]
    netns_dir: Option<PathBuf>,
    /// Admin address (config dump).
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// Prometheus metrics address.
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: SocketAddr,
    /// Readiness address.
    #[arg(long, default_value = "0.0.0.0:15021")]
    readiness_addr: SocketAddr,
    /// Grace period for open connections at shutdown.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    drain_grace: Duration,
    /// Connections each pod listener (15001, 15006, 15008) holds at once; more are closed at
    /// once and counted in `membrane_listener_connections_refused_total`. Also the inbound
    /// HBONE tunnels a pod holds at once (more are answered 503).
    #[arg(long, default_value_t = 16384)]
    pod_max_connections: usize,
    /// Connections one peer IP holds at once on each pod's inbound listeners (15006, 15008),
    /// and inbound HBONE tunnels it holds to one pod (gateways of the mesh relaying many
    /// sources: an east-west gateway gets half of the pod's listener, and neither it nor an
    /// ingress gateway is held to the tunnel share).
    #[arg(long, default_value_t = 4096)]
    pod_max_connections_per_peer: usize,
    #[command(flatten)]
    http: HttpArgs,
    /// Bound on an inbound HBONE (15008) TLS + HTTP/2 handshake, waiting for its turn included.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    hbone_handshake_timeout: Duration,
    /// Inbound HBONE handshakes in progress at once, node-wide (each holds a read buffer).
    #[arg(long, default_value_t = 256)]
    hbone_max_pending_handshakes: usize,
    /// A pooled outbound HBONE connection that carried no tunnel for this long is closed.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pool_idle_timeout: Duration,
    /// Upstream resolver of the DNS capture (`IP` or `IP:PORT`, port 53 by default); default:
    /// the first `nameserver` of /etc/resolv.conf. Queries are sent from the pod's network
    /// namespace, so it must be reachable from pods (kube-dns is).
    #[arg(long, env = "MEMBRANE_DNS_UPSTREAM", value_parser = parse_upstream)]
    dns_upstream: Option<SocketAddr>,
    /// How long the upstream resolver may take before the pod is answered SERVFAIL.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    dns_upstream_timeout: Duration,
    /// How long a DNS pin outlives its answer's TTL (at least 30s).
    #[arg(long, default_value = "30s", value_parser = parse_pin_grace)]
    dns_pin_grace: Duration,
    /// Addresses pinned per pod; the oldest pin is evicted beyond it.
    #[arg(long, default_value_t = 10_000)]
    dns_max_pins_per_pod: usize,
    /// Cluster domain of the mesh Service names the DNS capture answers itself.
    #[arg(long, default_value = "cluster.local")]
    dns_cluster_domain: String,
    /// On shutdown, also remove every pod's capture rules (default: keep them so a restarted
    /// ztunnel resumes, and traffic fails closed meanwhile).
    #[arg(long)]
    unenroll_on_exit: bool,
    /// Worker threads of the proxy runtime; 0 (the default) sizes them from the CPUs this
    /// process may use (cgroup quota included): half of them, at least 1 and at most 4.
    #[arg(long, env = "MEMBRANE_ZTUNNEL_WORKERS", default_value_t = 0)]
    worker_threads: usize,
    /// After forwarding bytes, keep polling the sockets instead of sleeping for a while:
    /// lower request/response latency for CPU. `auto` (the default) learns the window from
    /// the traffic (up to 100us; never kept open by a proxy idle longer than that between
    /// messages) and polls at most four times as long as the proxy works; a duration (at
    /// most 1ms) is a fixed window with no budget, up to a core's worth of CPU while messages
    /// come closer together than it; `off` (or 0s) never. Runs on one worker thread: a
    /// duration picks one when --worker-threads is 0 and refuses more; `auto` is off on a
    /// runtime with several.
    #[arg(long, env = "MEMBRANE_ZTUNNEL_BUSY_POLL", default_value = "auto")]
    busy_poll: membrane_ztunnel::busy_poll::BusyPoll,
    /// Log format (logs go to stderr; access records are JSON lines on stdout).
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Key exchange of every TLS session (tunnels and the controller): `pq-preferred`
    /// (X25519MLKEM768, then X25519 for peers without it), `pq-only` or `classical`.
    #[arg(long, env = "MEMBRANE_TLS_KX", default_value = "pq-preferred")]
    tls_kx: membrane_identity::KeyExchange,
    /// Default TCP congestion control of enrolled pods, whose TCP runs only over their
    /// loopback to the ztunnel: the first of these (comma-separated) that the node's
    /// `net.ipv4.tcp_allowed_congestion_control` lets a pod have (cubic, else reno: no
    /// pacing timers there), or `node` to leave pods as they are; the ztunnel's connections
    /// across the network keep the node's.
    #[arg(long, env = "MEMBRANE_POD_TCP_CONGESTION", default_value = membrane_ztunnel::congestion::DEFAULT_POD)]
    pod_tcp_congestion: membrane_ztunnel::congestion::PodCongestion,
    /// Where `/proc/sys/net` is mounted, writable: pods' sysctls are written through it from
    /// inside their namespace (a container's own `/proc/sys` is read-only).
    #[arg(long, env = "MEMBRANE_PROC_SYS_NET", default_value = membrane_ztunnel::congestion::DEFAULT_PROC_SYS_NET)]
    proc_sys_net: PathBuf,
    /// Status a policy denial is answered with: 403 (Membrane) or 401 (as Istio's ztunnel).
    #[arg(long, env = "MEMBRANE_DENY_STATUS", default_value = "403")]
    deny_status: membrane_ztunnel::hbone::DenialStatus,
    /// This cluster's name, sent in `baggage` (`k8s.cluster.name`) for the destination's
    /// telemetry.
    #[arg(long, env = "MEMBRANE_CLUSTER_NAME", default_value = membrane_ztunnel::dialect::DEFAULT_CLUSTER, value_parser = membrane_ztunnel::dialect::parse_cluster_name)]
    cluster_name: String,
    /// Gateway mode: serve one gateway pod (`egress`, `ingress` or `east-west`) instead of capturing this
    /// node's pods; needs --gateway-pod.
    #[arg(long, value_enum, requires = "gateway_pod", env = "MEMBRANE_GATEWAY")]
    gateway: Option<GatewayKindArg>,
    /// The gateway pod, `<namespace>/<name>` (in Kubernetes: from the downward API).
    #[arg(long, value_parser = membrane_ztunnel::gateway::parse_pod, requires = "gateway", env = "MEMBRANE_GATEWAY_POD")]
    gateway_pod: Option<(String, String)>,
    /// The gateway pod's network namespace (default: this process's own, as in a gateway
    /// container).
    #[arg(long, requires = "gateway")]
    gateway_netns: Option<PathBuf>,
    /// Ingress gateway mode: a client connection that carried no byte either way for this
    /// long is closed (between one and two times this after its last byte; 0s: never).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    gateway_idle_timeout: Duration,
}

/// `--gateway`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum GatewayKindArg {
    Egress,
    Ingress,
    EastWest,
}

fn parse_upstream(text: &str) -> Result<SocketAddr, String> {
    text.parse::<SocketAddr>()
        .or_else(|_| {
            text.parse::<std::net::IpAddr>()
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .map_err(|_| format!("{text:?} is not an IP address or IP:PORT"))
}

fn parse_pin_grace(text: &str) -> Result<Duration, String> {
    let grace = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if grace < membrane_ztunnel::dns::pins::MIN_GRACE {
        return Err("the pin grace period is at least 30s".into());
    }
    Ok(grace)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_tracing(args.log_format);
    membrane_ztunnel::memory::tune_allocator();
    membrane_identity::set_key_exchange(args.tls_kx);
    membrane_ztunnel::congestion::configure(&args.pod_tcp_congestion, &args.proc_sys_net);
    tracing::info!(tls_kx = %args.tls_kx, deny_status = %args.deny_status.status(), cluster = %args.cluster_name, "wire settings");
    raise_fd_limit();
    let token = std::fs::read_to_string(&args.token_file)
        .with_context(|| format!("reading the token file {}", args.token_file.display()))?
        .trim()
        .to_owned();
    let root_pem = std::fs::read(&args.ca_root)
        .with_context(|| format!("reading the CA root {}", args.ca_root.display()))?;
    let dns_upstream = args.dns_upstream.or_else(|| {
        let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        membrane_ztunnel::dns::upstream::from_resolv_conf(&text)
    });
    let gateway = match (args.gateway, args.gateway_pod) {
        (Some(kind), Some((namespace, pod))) => Some(GatewayConfig {
            kind: match kind {
                GatewayKindArg::Egress => GatewayKind::Egress,
                GatewayKindArg::Ingress => GatewayKind::Ingress,
                GatewayKindArg::EastWest => GatewayKind::EastWest,
            },
            namespace,
            pod,
            netns: args.gateway_netns,
            resolver: Resolver {
                upstream: dns_upstream.context(
                    "a gateway resolves names itself: give --dns-upstream or a nameserver in /etc/resolv.conf",
                )?,
                timeout: args.dns_upstream_timeout,
            },
            idle_timeout: (!args.gateway_idle_timeout.is_zero()).then_some(args.gateway_idle_timeout),
        }),
        _ => None,
    };
    let config = ZtunnelConfig {
        node: args.node,
        trust_domain: membrane_identity::spiffe_id::parse_trust_domain(&args.trust_domain)?,
        workloads_file: args.workloads_file,
        policy_file: args.policy_file,
        ca: CaConfig {
            endpoint: args.ca_address,
            root_pem,
            server_name: args.ca_server_name,
            token,
            token_file: Some(args.token_file.clone()),
            ttl: args.cert_ttl,
        },
        enroll_socket: args.enroll_socket,
        state_dir: Some(args.state_dir),
        netns_dir: args.netns_dir,
        admin_addr: args.admin_addr,
        metrics_addr: args.metrics_addr,
        readiness_addr: args.readiness_addr,
        drain_grace: args.drain_grace,
        pool_idle_timeout: args.pool_idle_timeout,
        dns: DnsSettings {
            capture: DnsConfig {
                upstream: dns_upstream,
                upstream_timeout: args.dns_upstream_timeout,
                cluster_domain: args
                    .dns_cluster_domain
                    .trim_matches('.')
                    .to_ascii_lowercase(),
                ..DnsConfig::default()
            },
            pin_grace: args.dns_pin_grace,
            max_pins_per_pod: args.dns_max_pins_per_pod,
        },
        listeners: ListenerConfig {
            pod_max_connections: args.pod_max_connections,
            pod_max_connections_per_peer: args.pod_max_connections_per_peer,
            http_max_connections: args.http.http_max_connections,
            http_max_connections_per_peer: args.http.http_max_connections_per_peer,
            http: args.http.timeouts(),
            hbone_handshake_timeout: args.hbone_handshake_timeout,
            hbone_max_pending_handshakes: args.hbone_max_pending_handshakes,
        },
        gateway,
        wire: membrane_ztunnel::dialect::WireDialect {
            denial: args.deny_status,
            cluster: args.cluster_name,
        },
    };
    let unenroll = args.unenroll_on_exit;
    let workers = match args.worker_threads {
        // A fixed busy-poll window runs on the single-threaded runtime.
        0 if matches!(args.busy_poll, BusyPoll::Fixed(_)) => 1,
        0 => default_workers(std::thread::available_parallelism().map_or(1, usize::from)),
        n => n,
    };
    let busy_poll = busy_poll_mode(args.busy_poll, workers)?;
    tracing::info!(workers, busy_poll = %busy_poll, "starting the proxy runtime");
    let serve = async move {
        let running = app::start(config).await?;
        membrane_runtime::shutdown_signal().await;
        tracing::info!("draining");
        running.shutdown(unenroll).await;
        Ok(())
    };
    if workers > 1 {
        return tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
            .context("cannot start the runtime")?
            .block_on(serve);
    }
    // One worker: a single-threaded runtime (no work-stealing queues, no wake-ups between a
    // worker and the thread that waits for it; docs/design.md, "Data-plane performance
    // decisions"), on a thread named for it so thread listings and profiles show the proxy.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_park(membrane_ztunnel::busy_poll::before_park)
        .on_thread_unpark(membrane_ztunnel::busy_poll::after_unpark)
        .build()
        .context("cannot start the runtime")?;
    std::thread::Builder::new()
        .name("ztunnel-proxy".into())
        .spawn(move || {
            rt.block_on(async move {
                if busy_poll != BusyPoll::Off {
                    membrane_ztunnel::busy_poll::enable(busy_poll);
                    tokio::spawn(membrane_ztunnel::busy_poll::spinner());
                }
                serve.await
            })
        })
        .context("cannot start the proxy thread")?
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Worker threads for `cpus` usable CPUs: half of them, at least 1, at most 4. A node proxy
/// shares the node with its pods; on this project's two-core benchmark one worker per ztunnel
/// beat two on every workload (docs/design.md, "Data-plane performance decisions").
fn default_workers(cpus: usize) -> usize {
    (cpus / 2).clamp(1, 4)
}

/// The busy polling a runtime of `workers` threads runs: only one thread supports it (its
/// state is the runtime thread's), so a fixed window with more is refused and `auto` is off.
fn busy_poll_mode(mode: BusyPoll, workers: usize) -> anyhow::Result<BusyPoll> {
    match mode {
        BusyPoll::Fixed(window) if workers > 1 => anyhow::bail!(
            "--busy-poll {window:?} needs one worker thread (--worker-threads 1); {workers} were asked for"
        ),
        BusyPoll::Adaptive if workers > 1 => {
            tracing::info!(workers, "busy polling is off: it runs on one worker thread");
            Ok(BusyPoll::Off)
        }
        mode => Ok(mode),
    }
}

/// Every captured connection holds two sockets; raise the soft descriptor limit to the hard
/// one, as a node proxy must.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(soft, hard, error = %e, "cannot raise the file descriptor limit");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the file descriptor limit"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn default_workers_are_half_the_cpus_between_one_and_four() {
        let picked: Vec<usize> = [1, 2, 3, 4, 8, 16, 64]
            .into_iter()
            .map(super::default_workers)
            .collect();
        assert_eq!(picked, [1, 1, 1, 2, 4, 4, 4]);
    }

    #[test]
    fn busy_poll_runs_on_one_worker() {
        use membrane_ztunnel::busy_poll::BusyPoll;
        use std::time::Duration;
        let fixed = BusyPoll::Fixed(Duration::from_micros(100));
        let mode = |m, w| super::busy_poll_mode(m, w).ok();
        assert_eq!(mode(BusyPoll::Off, 4), Some(BusyPoll::Off));
        assert_eq!(mode(fixed, 1), Some(fixed));
        assert_eq!(mode(BusyPoll::Adaptive, 1), Some(BusyPoll::Adaptive));
        assert_eq!(mode(BusyPoll::Adaptive, 2), Some(BusyPoll::Off));
        let two = super::busy_poll_mode(fixed, 2).expect_err("two workers");
        assert!(two.to_string().contains("--worker-threads 1"), "{two}");
    }
}
