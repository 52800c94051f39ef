use super::*;
use crate::source::test_pods;

const WAIT: Duration = Duration::from_secs(10);
const TOKEN: &str = "node-a-token-abcdefgh";

struct Fixture {
    service: DiscoveryService,
    tokens: crate::token_file::TokenSet,
    bundle: Arc<TrustBundle>,
    _state_tx: watch::Sender<Option<Arc<ClusterState>>>,
    _bundle_tx: watch::Sender<Arc<TrustBundle>>,
    _dir: tempfile::TempDir,
}

/// A discovery service over an empty (loaded) state, authenticating `node-a` by [`TOKEN`].
fn fixture() -> Fixture {
    let td = membrane_identity::spiffe_id::parse_trust_domain("cluster.local").expect("td");
    let dir = tempfile::tempdir().expect("tempdir");
    let bundle = Arc::new(
        crate::SigningAuthority::load_or_create(dir.path(), &td, Duration::from_secs(3600))
            .expect("root")
            .bundle()
            .clone(),
    );
    let tokens = crate::token_file::TokenSet::new(
        crate::node_auth::BootstrapTokens::parse("t", &format!("node-a {TOKEN}\n"))
            .expect("tokens"),
    );
    let (state_tx, state_rx) = watch::channel(Some(Arc::new(ClusterState::default())));
    let (bundle_tx, bundle_rx) = watch::channel(bundle.clone());
    let service = DiscoveryService::new(
        tokens.clone().into(),
        state_rx,
        bundle_rx,
        DiscoveryMetrics::default(),
        CancellationToken::new(),
    );
    Fixture {
        service,
        tokens,
        bundle,
        _state_tx: state_tx,
        _bundle_tx: bundle_tx,
        _dir: dir,
    }
}

/// Opens a stream of `node`'s view booked under `book`, and returns it with its snapshot's
/// version.
async fn open(
    service: &DiscoveryService,
    node: &str,
    book: &str,
) -> (mpsc::Receiver<Result<pb::Update, Status>>, u64) {
    let slot = service
        .open
        .take(&book.to_owned(), MAX_STREAMS_PER_CALLER)
        .expect("a place");
    let (tx, mut rx) = mpsc::channel(4);
    let credential = (
        TOKEN.to_owned(),
        crate::tokenreview::Caller::node(node.to_owned()),
    );
    tokio::spawn(
        service
            .clone()
            .stream(node.to_owned(), book.to_owned(), credential, slot, tx),
    );
    let snapshot = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("in time")
        .expect("open")
        .expect("an update");
    assert!(snapshot.snapshot);
    (rx, snapshot.version)
}

/// A gateway pod's stream books the bundle under its own key, not its node's: once the node
/// and the gateway both confirmed their snapshots, nobody is waited for.
#[tokio::test]
async fn a_gateway_stream_books_its_bundle_under_its_own_key() {
    let f = fixture();
    let gateway = ack_book_key(&crate::tokenreview::Caller {
        node: "node-a".to_owned(),
        gateway: Some(("egress".to_owned(), "egress-gateway".to_owned())),
    });
    let (_node_rx, node_version) = open(&f.service, "node-a", "node-a").await;
    let (_gateway_rx, gateway_version) = open(&f.service, "node-a", &gateway).await;
    let acks = f.service.acks();
    // The stream books what it sent right after sending: confirm until that landed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        acks.acked("node-a", node_version);
        acks.acked(&gateway, gateway_version);
        let pending = acks.pending(&f.bundle);
        if pending.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "both confirmed their snapshots, still waited for: {pending:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn watch_request() -> Request<pb::WatchRequest> {
    let mut request = Request::new(pb::WatchRequest {
        node: "node-a".to_owned(),
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {TOKEN}").parse().expect("ascii"),
    );
    request
}

/// One credential holds at most `MAX_STREAMS_PER_CALLER` streams; the next is refused with
/// RESOURCE_EXHAUSTED and counted; a closed stream frees its place.
#[tokio::test]
async fn a_credential_holds_at_most_four_watch_streams() {
    let f = fixture();
    let mut held = Vec::new();
    for _ in 0..MAX_STREAMS_PER_CALLER {
        let stream = f
            .service
            .watch(watch_request())
            .await
            .expect("under the limit");
        held.push(stream.into_inner());
    }
    let refused = f
        .service
        .watch(watch_request())
        .await
        .expect_err("one too many");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert!(
        refused.message().contains("node-a"),
        "{}",
        refused.message()
    );
    let too_many = || {
        f.service
            .metrics
            .refused
            .get_or_create(&RefusedLabels {
                reason: "too_many_streams",
            })
            .get()
    };
    assert_eq!(too_many(), 1);
    // Closing one frees its place (once its task noticed).
    drop(held.pop());
    let deadline = tokio::time::Instant::now() + WAIT;
    let reopened = loop {
        match f.service.watch(watch_request()).await {
            Ok(stream) => break stream,
            Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "a closed stream never gave its place back"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(status) => panic!("unexpected refusal: {status:?}"),
        }
    };
    held.push(reopened.into_inner());
    assert_eq!(
        f.service.open.held(&"node-a".to_owned()),
        MAX_STREAMS_PER_CALLER
    );
}

/// `membrane_ca_discovery_withheld_pod_ips{reason}` of the fixture's service.
fn withheld_gauge(f: &Fixture, reason: &'static str) -> i64 {
    f.service
        .metrics
        .withheld
        .get_or_create(&WithheldLabels { reason })
        .get()
}

/// A contested pod address is counted by reason in the gauge while it lasts, and the gauge
/// falls back when it ends.
#[test]
fn withheld_addresses_are_counted_while_they_last() {
    let f = fixture();
    let gauge = |reason| withheld_gauge(&f, reason);
    let pod =
        |name: &str, node: &str| test_pods::pod("a", name, node, "10.0.0.7".parse().expect("ip"));
    let mut state = ClusterState::default();
    for p in [pod("victim", "node-a"), pod("thief", "node-b")] {
        test_pods::insert(&mut state, p);
    }
    f._state_tx.send_replace(Some(Arc::new(state.clone())));
    let view = f.service.mesh_view().expect("loaded");
    assert_eq!(view.withheld().len(), 1);
    assert_eq!((gauge("contested"), gauge("service_ip")), (1, 0));
    state.pods.remove(&("a".to_owned(), "thief".to_owned()));
    f._state_tx.send_replace(Some(Arc::new(state)));
    assert!(f.service.mesh_view().expect("loaded").withheld().is_empty());
    assert_eq!(gauge("contested"), 0);
}

/// With the pod networks named, a pod address outside them is withheld and counted apart.
#[test]
fn an_address_outside_the_pod_networks_is_counted_apart() {
    let f = fixture();
    let gauge = |reason| withheld_gauge(&f, reason);
    let mut state = ClusterState::default();
    let pod = test_pods::pod(
        "a",
        "hub-squatter",
        "node-a",
        "203.0.113.10".parse().expect("ip"),
    );
    test_pods::insert(&mut state, pod);
    state.pod_networks = vec!["10.0.0.0/8".parse().expect("net")];
    f._state_tx.send_replace(Some(Arc::new(state)));
    let view = f.service.mesh_view().expect("loaded");
    assert_eq!(view.withheld().len(), 1);
    assert_eq!((gauge("outside_pod_networks"), gauge("contested")), (1, 0));
}

/// A `--pod-networks` that misses a pod range withholds every pod of it at once: the first
/// addresses are logged one by one, the rest in one line with their count by reason, and the
/// gauge counts them all.
#[test]
fn a_mass_withholding_is_logged_in_bounded_lines() {
    #[derive(Clone, Default)]
    struct Lines(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lines").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let f = fixture();
    let mut state = ClusterState::default();
    for i in 0..40u8 {
        let ip = std::net::IpAddr::from([10, 99, 0, i]);
        test_pods::insert(
            &mut state,
            test_pods::pod("a", &format!("p{i}"), "node-a", ip),
        );
    }
    state.pod_networks = vec!["10.0.0.0/16".parse().expect("net")];
    let lines = Lines::default();
    let writer = lines.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        f._state_tx.send_replace(Some(Arc::new(state)));
        assert_eq!(f.service.mesh_view().expect("loaded").withheld().len(), 40);
    });
    let text = String::from_utf8(lines.0.lock().expect("lines").clone()).expect("utf-8");
    let one_by_one = text.matches("pod address withheld:").count();
    assert_eq!(one_by_one, WITHHELD_LOG_LINES, "{text}");
    assert!(
        text.contains("more pod addresses withheld")
            && text.contains("\"outside_pod_networks\": 24"),
        "{text}"
    );
    assert_eq!(withheld_gauge(&f, "outside_pod_networks"), 40);
}

/// A stream whose bootstrap token is removed from the tokens in force ends with
/// UNAUTHENTICATED at its next credential check; while the token is good it stays.
#[tokio::test]
async fn a_stream_ends_when_its_credential_is_revoked() {
    let mut f = fixture();
    f.service = f
        .service
        .clone()
        .with_credential_recheck(Duration::from_millis(100));
    let (mut rx, _) = open(&f.service, "node-a", "node-a").await;
    // Several checks pass with the token in force.
    assert!(
        tokio::time::timeout(Duration::from_millis(350), rx.recv())
            .await
            .is_err(),
        "the stream ended or sent with a good credential"
    );
    f.tokens.replace(
        crate::node_auth::BootstrapTokens::parse("t", "node-b node-b-token-abcdefgh\n")
            .expect("tokens"),
    );
    let ended = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("in time")
        .expect("an item");
    let status = ended.expect_err("ended with a status");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(
        tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("in time")
            .is_none(),
        "closed after the status"
    );
    assert_eq!(
        f.service
            .metrics
            .refused
            .get_or_create(&RefusedLabels {
                reason: "credential_revoked"
            })
            .get(),
        1
    );
}
