//! The controller assembled: the one place its long-lived tasks are spawned.
//!
//! [`start`] loads the signing authority and the token file, binds the listeners (so a busy
//! port is reported before anything runs), and spawns the workload source, the metrics endpoint
//! and the gRPC server (`Certificates` and `Discovery`), all watching one cancellation token. [`Running::shutdown`] cancels it
//! and waits for the tasks, up to a grace deadline.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use membrane_identity::{TrustBundle, TrustDomain};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::authority::{AuthorityError, SigningAuthority};
use crate::certificates::CertificateService;
use crate::discovery::{DiscoveryMetrics, DiscoveryService};
use crate::endpoint;
use crate::metrics::{self, SignMetrics, SourceMetrics};
use crate::node_auth::{BootstrapTokens, TokenFileError};
use crate::plugin_reload::{PluginMetrics, PluginReloader};
use crate::rotation::{self, RotationError, RotationMetrics, Rotator};
use crate::server::{self, ServerError};
use crate::serving::{ListenerConfig, ServingCert};
use crate::signer::{Signer, SignerConfig};
use crate::source::StateReceiver;
use crate::source::directory::{self, DirectorySource};
use crate::token_file::TokenSet;
use crate::tokenreview::{NodeAuthenticator, TokenReviewConfig, TokenReviewer};
use membrane_runtime::listener::{ConnectionCaps, GuardedListener, ListenerMetrics};

/// How long shutdown waits for tasks to finish before giving up on them.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// Everything the controller needs to start.
#[derive(Debug, Clone)]
pub struct AppConfig {
    /// Trust domain of every identity issued.
    pub trust_domain: TrustDomain,
    /// Directory of the self-managed root.
    pub state_dir: PathBuf,
    /// Operator-supplied CA directory; replaces the self-managed root when set.
    pub plugin_ca_dir: Option<PathBuf>,
    /// Lifetime of a newly created self-managed root.
    pub root_ttl: Duration,
    /// Manifest directory of the workload source.
    pub source_dir: PathBuf,
    /// Rescan period of the manifest directory.
    pub reload_interval: Duration,
    /// Bootstrap token file.
    pub tokens_file: PathBuf,
    /// gRPC listen address (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Metrics and readiness listen address.
    pub metrics_listen: SocketAddr,
    /// Extra names for the serving certificate.
    pub server_names: Vec<String>,
    /// Root rotation: the least time a new root is distributed (after its start, or after a
    /// restart) before signing switches to it.
    pub rotation_grace: Duration,
    /// Root rotation: the longest wait for every connected node's acknowledgement of the new
    /// root; past it, signing switches and the silent nodes are reported.
    pub rotation_ack_timeout: Duration,
    /// The root namespace: its selector-less AuthorizationPolicies apply mesh-wide (Istio's
    /// is `istio-system`).
    pub root_namespace: String,
    /// The networks pod addresses are allocated from: a pod address outside them is
    /// published for no pod. Empty: not checked.
    pub pod_networks: Vec<membrane_policy::IpNet>,
    /// Lifetime of the serving certificate.
    pub serving_cert_ttl: Duration,
    /// Workload certificate lifetimes.
    pub signer: SignerConfig,
    /// Caps and timeouts of the gRPC and metrics listeners.
    pub listeners: ListenerConfig,
    /// SPIFFE Federation: the bundle endpoint and the federation listener.
    pub federation: FederationConfig,
}

/// The federation listeners' settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FederationConfig {
    /// Where the SPIFFE bundle endpoint listens (none: not served).
    pub bundle_endpoint: Option<SocketAddr>,
    /// `spiffe_refresh_hint` served to federated peers. A root rotation distributes the new
    /// root for at least twice this long when the endpoint is served, so peers fetch it
    /// before anything is signed with it.
    pub refresh_hint: Duration,
    /// Where federated controllers watch this cluster's exported Services (gRPC, mutual
    /// TLS; none: not served).
    pub exports_listen: Option<SocketAddr>,
}

impl Default for FederationConfig {
    fn default() -> Self {
        Self {
            bundle_endpoint: None,
            exports_listen: None,
            refresh_hint: crate::federation::DEFAULT_REFRESH,
        }
    }
}

/// Why the controller could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The lifetimes are inconsistent.
    #[error(
        "default certificate lifetime {default:?} must be positive and at most the maximum {max:?}"
    )]
    Lifetimes {
        /// Default lifetime.
        default: Duration,
        /// Maximum lifetime.
        max: Duration,
    },
    /// The signing authority could not be loaded or created.
    #[error(transparent)]
    Authority(#[from] AuthorityError),
    /// The root (or an interrupted root rotation) could not be loaded.
    #[error(transparent)]
    Rotation(#[from] RotationError),
    /// The token file is unusable.
    #[error(transparent)]
    Tokens(#[from] TokenFileError),
    /// The serving certificate could not be issued.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The federation listener's TLS could not be configured.
    #[error("federation listener TLS: {0}")]
    FederationTls(String),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// A started controller.
#[derive(Debug)]
pub struct Running {
    bundle_endpoint_addr: Option<SocketAddr>,
    exports_addr: Option<SocketAddr>,
    grpc_addr: SocketAddr,
    metrics_addr: SocketAddr,
    bundle: TrustBundle,
    /// The bundle streamed to the ztunnels (root rotation publishes here).
    bundle_tx: tokio::sync::watch::Sender<Arc<TrustBundle>>,
    state: StateReceiver,
    cancel: CancellationToken,
    grpc: JoinHandle<Result<(), ServerError>>,
    others: Vec<JoinHandle<()>>,
}

/// Where the cluster state comes from, and how nodes prove who they are.
#[derive(Debug, Clone, Default)]
pub enum SourceMode {
    /// Manifests in [`AppConfig::source_dir`], nodes by bootstrap token
    /// ([`AppConfig::tokens_file`]).
    #[default]
    Directory,
    /// The Kubernetes API (`source_dir`, `reload_interval` and `tokens_file` are unused).
    Kubernetes(Box<KubernetesMode>),
}

/// The Kubernetes source's settings.
#[derive(Clone)]
pub struct KubernetesMode {
    /// The API client (`kube::Client::try_default()` in the binary).
    pub client: kube::Client,
    /// TokenReview node authentication.
    pub token_review: TokenReviewConfig,
    /// Policy status write-back and its Lease.
    pub status: crate::status::StatusConfig,
}

impl std::fmt::Debug for KubernetesMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesMode")
            .field("token_review", &self.token_review)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

/// Starts the controller with the directory source.
pub async fn start(config: AppConfig) -> Result<Running, StartError> {
    start_with(config, SourceMode::Directory).await
}

/// Starts the controller with the source `mode`.
pub async fn start_with(config: AppConfig, mode: SourceMode) -> Result<Running, StartError> {
    let SignerConfig {
        default_ttl,
        max_ttl,
        ..
    } = config.signer;
    if default_ttl.is_zero() || default_ttl > max_ttl {
        return Err(StartError::Lifetimes {
            default: default_ttl,
            max: max_ttl,
        });
    }
    let (authority, phase) = match &config.plugin_ca_dir {
        Some(dir) => (
            SigningAuthority::load_plugin(dir, &config.trust_domain)?,
            None,
        ),
        None => {
            let (authority, phase) =
                rotation::load(&config.state_dir, &config.trust_domain, config.root_ttl)?;
            (authority, Some(phase))
        }
    };
    tracing::info!(
        trust_domain = %config.trust_domain,
        root_namespace = %config.root_namespace,
        plugin = config.plugin_ca_dir.is_some(),
        roots = authority.bundle().roots().len(),
        signing_not_after = %authority.not_after(),
        rotation = phase.as_ref().map_or("plug-in", |p| p.name()),
        "signing authority loaded"
    );
    if config.pod_networks.is_empty() {
        tracing::warn!(
            "--pod-networks is not set: a pod address is not checked against the pod networks, so a compromised node could claim an outside address for a pod of its own"
        );
    } else {
        tracing::info!(pod_networks = ?config.pod_networks.iter().map(ToString::to_string).collect::<Vec<_>>(), "pod addresses outside these networks are published for no pod");
    }
    let bundle = authority.bundle().clone();
    let signer = Signer::new(authority, config.signer);
    let tokens = match &mode {
        SourceMode::Directory => Some(BootstrapTokens::load(&config.tokens_file)?),
        SourceMode::Kubernetes(_) => None,
    };
    let serving = Arc::new(
        ServingCert::new(
            signer.clone(),
            config.server_names.clone(),
            config.serving_cert_ttl,
        )
        .map_err(|e| ServerError::Certificate(e.to_string()))?,
    );

    let mut registry = metrics::registry();
    let sign_metrics = SignMetrics::register(&mut registry);
    let source_metrics = SourceMetrics::register(&mut registry);
    let discovery_metrics = DiscoveryMetrics::register(&mut registry);
    let rotation_metrics = RotationMetrics::register(&mut registry);
    let plugin_metrics = PluginMetrics::register(&mut registry);
    let mut token_watch = None;
    let authenticator: NodeAuthenticator = match (&mode, tokens) {
        (SourceMode::Kubernetes(k), _) => TokenReviewer::new(
            k.client.clone(),
            k.token_review.clone(),
            metrics::TokenReviewMetrics::register(&mut registry),
        )
        .into(),
        (SourceMode::Directory, tokens) => {
            let tokens = TokenSet::new(tokens.unwrap_or_default());
            token_watch = Some(tokens.clone());
            tokens.into()
        }
    };
    let token_file_metrics = crate::token_file::TokenFileMetrics::register(&mut registry);
    let status_metrics = metrics::StatusMetrics::register(&mut registry);
    let federation_metrics = crate::federation::FederationMetrics::register(&mut registry);
    let listener_metrics = ListenerMetrics::register(&mut registry);
    let registry = Arc::new(registry);

    let bind = |addr: SocketAddr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })
    };
    let listener = bind(config.listen).await?;
    let metrics_listener = bind(config.metrics_listen).await?;
    let bundle_listener = match config.federation.bundle_endpoint {
        Some(addr) => Some((bind(addr).await?, addr)),
        None => None,
    };
    let local = |l: &tokio::net::TcpListener, addr| {
        l.local_addr()
            .map_err(|source| StartError::Bind { addr, source })
    };
    let grpc_addr = local(&listener, config.listen)?;
    let metrics_addr = local(&metrics_listener, config.metrics_listen)?;
    let bundle_endpoint_addr = match &bundle_listener {
        Some((l, addr)) => Some(local(l, *addr)?),
        None => None,
    };
    let exports_listener = match config.federation.exports_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let exports_addr = match (&exports_listener, config.federation.exports_listen) {
        (Some(l), Some(addr)) => Some(local(l, addr)?),
        _ => None,
    };

    let cancel = CancellationToken::new();
    let (state_tx, state_rx) = tokio::sync::watch::channel(None);
    let source = match &mode {
        SourceMode::Directory => tokio::spawn(directory::run(
            DirectorySource::new(&config.source_dir).with_pod_networks(config.pod_networks.clone()),
            config.reload_interval,
            state_tx,
            source_metrics,
            cancel.clone(),
        )),
        SourceMode::Kubernetes(k) => {
            let (reports_tx, reports_rx) = tokio::sync::watch::channel(None);
            let watch = crate::source::kube::run(
                k.client.clone(),
                crate::source::kube::KubeSourceConfig {
                    pod_networks: config.pod_networks.clone(),
                    ..Default::default()
                },
                state_tx,
                reports_tx,
                source_metrics,
                cancel.clone(),
            );
            let status = crate::status::run(
                k.client.clone(),
                k.status.clone(),
                reports_rx,
                status_metrics,
                cancel.clone(),
            );
            tokio::spawn(async move {
                tokio::join!(watch, status);
            })
        }
    };
    let limits = config.listeners;
    let metrics_listener = GuardedListener::new(
        metrics_listener,
        "metrics",
        ConnectionCaps {
            max: limits.http_max_connections,
            max_per_peer: limits.http_max_connections_per_peer,
        },
        listener_metrics.clone(),
    );
    let metrics = tokio::spawn(endpoint::serve(
        metrics_listener,
        registry,
        state_rx.clone(),
        limits.http,
        cancel.clone(),
    ));
    let service = CertificateService::new(
        signer.clone(),
        authenticator.clone(),
        state_rx.clone(),
        sign_metrics,
    );
    let (bundle_tx, bundle_rx) = tokio::sync::watch::channel(Arc::new(bundle.clone()));
    let discovery = DiscoveryService::new(
        authenticator,
        state_rx.clone(),
        bundle_rx,
        discovery_metrics,
        cancel.clone(),
    )
    .with_root_namespace(&config.root_namespace);
    let (federated_tx, federated_rx) = tokio::sync::watch::channel(Arc::new(Vec::new()));
    let (imports_tx, imports_rx) = tokio::sync::watch::channel(Arc::default());
    let discovery = discovery
        .with_federated(federated_rx.clone())
        .with_imports(imports_rx);
    let mut others = vec![source, metrics];
    others.push(tokio::spawn(crate::federation::run(
        config.trust_domain.clone(),
        state_rx.clone(),
        crate::federation::Outputs {
            bundles: federated_tx,
            imports: imports_tx,
            serving: serving.clone(),
            store: crate::federation::persist::Store::new(&config.state_dir),
        },
        federation_metrics,
        cancel.clone(),
    )));
    if let Some(listener) = exports_listener {
        use crate::federation::services;
        let trust = membrane_identity::SharedTrustBundle::new(bundle.clone());
        others.push(tokio::spawn(services::follow_trust(
            trust.clone(),
            bundle_tx.subscribe(),
            federated_rx,
            cancel.clone(),
        )));
        let tls = services::server_tls(serving.clone(), trust.clone())
            .map_err(|e| StartError::FederationTls(e.to_string()))?;
        let incoming = crate::serving::incoming_on(
            services::LISTENER,
            listener,
            Arc::new(tls),
            limits,
            listener_metrics.clone(),
            // Mutual TLS: the handshake authenticates the caller.
            None,
            cancel.clone(),
        );
        let exports = services::ExportService::new(
            config.trust_domain.clone(),
            state_rx.clone(),
            trust,
            cancel.clone(),
        );
        let stop = cancel.clone();
        others.push(tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .timeout(Duration::from_secs(30))
                .http2_keepalive_interval(Some(Duration::from_secs(10)))
                .http2_keepalive_timeout(Some(Duration::from_secs(5)))
                .max_concurrent_streams(16)
                .concurrency_limit_per_connection(16)
                .add_service(
                    membrane_proto::v1::service_exports_server::ServiceExportsServer::new(exports)
                        .max_decoding_message_size(1024)
                        .max_encoding_message_size(services::MAX_MESSAGE_LEN),
                )
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "federation listener failed");
            }
        }));
    }
    if let Some((listener, _)) = bundle_listener {
        let listener = GuardedListener::new(
            listener,
            crate::federation::endpoint::LISTENER,
            ConnectionCaps {
                max: limits.http_max_connections,
                max_per_peer: limits.http_max_connections_per_peer,
            },
            listener_metrics.clone(),
        );
        others.push(tokio::spawn(crate::federation::endpoint::serve(
            listener,
            serving.clone(),
            bundle_tx.subscribe(),
            crate::federation::endpoint::EndpointConfig {
                refresh_hint: config.federation.refresh_hint,
                handshake_timeout: limits.tls_handshake_timeout,
                http: limits.http,
            },
            cancel.clone(),
        )));
    }
    // Federated peers fetch the new root at their refresh hint: it is distributed at least
    // twice that long before anything is signed with it.
    let rotation_grace = match config.federation.bundle_endpoint {
        Some(_) => config
            .rotation_grace
            .max(config.federation.refresh_hint * 2),
        None => config.rotation_grace,
    };
    let renew = serving.clone();
    let on_switch: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
        if let Err(e) = renew.renew() {
            tracing::error!(error = %e, "cannot re-issue the serving certificate under the new signing CA");
        }
    });
    if let Some(dir) = &config.plugin_ca_dir {
        let reloader = PluginReloader {
            dir: dir.clone(),
            trust_domain: config.trust_domain.clone(),
            signer: signer.clone(),
            on_switch: on_switch.clone(),
            metrics: plugin_metrics,
        };
        others.push(tokio::spawn(reloader.run(cancel.clone())));
    }
    if let Some(phase) = phase {
        let rotator = Rotator {
            dir: config.state_dir.clone(),
            trust_domain: config.trust_domain.clone(),
            signer,
            bundle_tx: bundle_tx.clone(),
            acks: discovery.acks(),
            max_ttl: config.signer.max_ttl,
            grace: rotation_grace,
            ack_timeout: config.rotation_ack_timeout,
            on_switch,
            metrics: rotation_metrics,
        };
        others.push(tokio::spawn(rotator.run(phase, cancel.clone())));
    }
    others.push(tokio::spawn(serving.clone().run(cancel.clone())));
    if let Some(tokens) = token_watch {
        others.push(tokio::spawn(crate::token_file::watch(
            config.tokens_file.clone(),
            tokens,
            config.reload_interval,
            token_file_metrics,
            cancel.clone(),
        )));
    }
    let grpc = tokio::spawn(server::serve(
        listener,
        service,
        discovery,
        serving,
        limits,
        listener_metrics,
        cancel.clone(),
    ));
    tracing::info!(
        listen = %grpc_addr,
        metrics = %metrics_addr,
        bundle_endpoint = ?bundle_endpoint_addr,
        federation = ?exports_addr,
        source = %match &mode {
            SourceMode::Directory => config.source_dir.display().to_string(),
            SourceMode::Kubernetes(_) => "kubernetes".to_owned(),
        },
        "membrane-ca serving"
    );
    Ok(Running {
        grpc_addr,
        metrics_addr,
        bundle_endpoint_addr,
        exports_addr,
        bundle,
        bundle_tx,
        state: state_rx,
        cancel,
        grpc,
        others,
    })
}

// === impl Running ===

impl Running {
    /// The gRPC address actually bound.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The federation listener's address actually bound, when served.
    pub fn exports_addr(&self) -> Option<SocketAddr> {
        self.exports_addr
    }

    /// The bundle endpoint's address actually bound, when served.
    pub fn bundle_endpoint_addr(&self) -> Option<SocketAddr> {
        self.bundle_endpoint_addr
    }

    /// The metrics address actually bound.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// The trust bundle at start (what a node is bootstrapped with).
    pub fn bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    /// The trust bundle streamed now (it changes during a root rotation).
    pub fn current_bundle(&self) -> TrustBundle {
        self.bundle_tx.borrow().as_ref().clone()
    }

    /// The bundle the discovery stream publishes; a new value reaches every ztunnel.
    pub fn bundle_sender(&self) -> &tokio::sync::watch::Sender<Arc<TrustBundle>> {
        &self.bundle_tx
    }

    /// Waits until the workload source has published its first state.
    pub async fn ready(&self) {
        let mut state = self.state.clone();
        let _ = state.wait_for(Option::is_some).await;
    }

    /// Waits until the gRPC server stops by itself (an error) or `signal` completes, then shuts
    /// everything down within [`DRAIN_DEADLINE`].
    pub async fn run_until(
        mut self,
        signal: impl std::future::Future<Output = ()>,
    ) -> Result<(), ServerError> {
        tokio::select! {
            () = signal => {
                tracing::info!("shutting down");
                self.shutdown().await;
                Ok(())
            }
            result = &mut self.grpc => {
                self.cancel.cancel();
                match result {
                    Ok(result) => result,
                    Err(e) => {
                        tracing::error!(error = %e, "gRPC server task failed");
                        Ok(())
                    }
                }
            }
        }
    }

    /// Stops every task: cancel, then wait up to [`DRAIN_DEADLINE`].
    pub async fn shutdown(self) {
        self.cancel.cancel();
        let Running { grpc, others, .. } = self;
        let drain = async move {
            let _ = grpc.await;
            for task in others {
                let _ = task.await;
            }
        };
        if tokio::time::timeout(DRAIN_DEADLINE, drain).await.is_err() {
            tracing::warn!("drain deadline passed; stopping anyway");
        }
    }
}
