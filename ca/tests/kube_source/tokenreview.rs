//! Node authorization through TokenReview: bound ztunnel and gateway tokens, typed refusals,
//! and the controller signing only for the reviewed node.

use super::*;

fn review_ok(username: &str, node: Option<&str>) -> Value {
    let extra = match node {
        Some(node) => json!({"authentication.kubernetes.io/node-name": [node],
                             "authentication.kubernetes.io/pod-name": ["ztunnel-x"]}),
        None => json!({}),
    };
    json!({"authenticated": true, "audiences": ["membrane-ca"],
           "user": {"username": username, "extra": extra}})
}

fn reviewer_setup() -> Setup {
    let mut setup = Setup::default();
    let ztunnel = "system:serviceaccount:membrane-system:ztunnel";
    setup
        .reviews
        .insert("good".into(), review_ok(ztunnel, Some("node-a")));
    setup.reviews.insert(
        "wrong-sa".into(),
        review_ok("system:serviceaccount:training:trainer", Some("node-a")),
    );
    setup
        .reviews
        .insert("unbound".into(), review_ok(ztunnel, None));
    setup.reviews.insert(
        "gateway".into(),
        review_ok(
            "system:serviceaccount:membrane-system:membrane-egress-gateway",
            Some("node-b"),
        ),
    );
    let mut other_audience = review_ok(ztunnel, Some("node-a"));
    other_audience["audiences"] = json!(["https://kubernetes.default.svc"]);
    setup
        .reviews
        .insert("other-audience".into(), other_audience);
    setup
}

fn bearer(token: &str) -> tonic::metadata::MetadataMap {
    let mut md = tonic::metadata::MetadataMap::new();
    md.insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    md
}

#[tokio::test]
async fn tokenreview_accepts_a_bound_ztunnel_token_and_caches_it() {
    let (client, mut api) = FakeApi::start(reviewer_setup());
    let metrics = TokenReviewMetrics::default();
    let auth = NodeAuthenticator::from(TokenReviewer::new(
        client,
        TokenReviewConfig::default(),
        metrics.clone(),
    ));
    let node = tokio::time::timeout(WAIT, auth.authenticate(&bearer("good"), None))
        .await
        .expect("in time");
    assert_eq!(node, Ok(Caller::node("node-a")));
    let review = api.next_seen(|s| s.path.ends_with("/tokenreviews")).await;
    assert_eq!(review.method, "POST");
    assert_eq!(review.body["spec"]["token"], "good");
    assert_eq!(review.body["spec"]["audiences"], json!(["membrane-ca"]));
    // Served from the cache: no second review.
    let node = auth.authenticate(&bearer("good"), None).await;
    assert_eq!(node, Ok(Caller::node("node-a")));
    let more = api
        .seen_within(Duration::from_millis(200), |s| {
            s.path.ends_with("/tokenreviews")
        })
        .await;
    assert!(more.is_empty(), "a cached token was reviewed again");
    let count = |outcome| {
        metrics
            .results
            .get_or_create(&membrane_ca::metrics::OutcomeLabels { outcome })
            .get()
    };
    assert_eq!((count("authenticated"), count("cached")), (1, 1));
}

#[tokio::test]
async fn a_gateway_accounts_token_names_its_node_and_only_its_own_identity() {
    let (client, _api) = FakeApi::start(reviewer_setup());
    let config = TokenReviewConfig {
        gateway_accounts: vec![(
            "membrane-system".to_owned(),
            "membrane-egress-gateway".to_owned(),
        )],
        ..TokenReviewConfig::default()
    };
    let auth = NodeAuthenticator::from(TokenReviewer::new(
        client,
        config,
        TokenReviewMetrics::default(),
    ));
    let caller = tokio::time::timeout(WAIT, auth.authenticate(&bearer("gateway"), None))
        .await
        .expect("in time")
        .expect("accepted");
    assert_eq!(
        caller,
        Caller {
            node: "node-b".to_owned(),
            gateway: Some((
                "membrane-system".to_owned(),
                "membrane-egress-gateway".to_owned()
            )),
        }
    );
    // The ztunnel account is still a node.
    let node = tokio::time::timeout(WAIT, auth.authenticate(&bearer("good"), None))
        .await
        .expect("in time");
    assert_eq!(node, Ok(Caller::node("node-a")));
}

#[tokio::test]
async fn tokenreview_refusals_are_typed() {
    let (client, _api) = FakeApi::start(reviewer_setup());
    let auth = NodeAuthenticator::from(TokenReviewer::new(
        client,
        TokenReviewConfig::default(),
        TokenReviewMetrics::default(),
    ));
    let check = |token: &'static str| {
        let auth = auth.clone();
        async move {
            tokio::time::timeout(WAIT, auth.authenticate(&bearer(token), None))
                .await
                .expect("in time")
        }
    };
    // A gateway account's token is refused unless the account is configured as one.
    assert!(matches!(
        check("gateway").await,
        Err(NodeAuthFailure::TokenReview(
            TokenReviewError::WrongAccount { .. }
        ))
    ));
    let refused = check("forged").await;
    assert!(
        matches!(&refused, Err(NodeAuthFailure::TokenReview(TokenReviewError::Unauthenticated(m))) if m.contains("invalid bearer token")),
        "{refused:?}"
    );
    assert_eq!(
        refused.expect_err("refused").status().code(),
        tonic::Code::Unauthenticated
    );
    assert!(matches!(
        check("wrong-sa").await,
        Err(NodeAuthFailure::TokenReview(TokenReviewError::WrongAccount { username })) if username == "system:serviceaccount:training:trainer"
    ));
    assert!(matches!(
        check("unbound").await,
        Err(NodeAuthFailure::TokenReview(
            TokenReviewError::NoNodeBinding { .. }
        ))
    ));
    assert!(matches!(
        check("other-audience").await,
        Err(NodeAuthFailure::TokenReview(TokenReviewError::Unauthenticated(m))) if m.contains("audience")
    ));
    let down = check("fail").await.expect_err("API error");
    assert!(matches!(
        down,
        NodeAuthFailure::TokenReview(TokenReviewError::Unavailable(_))
    ));
    assert_eq!(down.status().code(), tonic::Code::Unavailable);
    let mut md = tonic::metadata::MetadataMap::new();
    md.insert("authorization", "Basic abc".parse().expect("ascii"));
    assert!(matches!(
        auth.authenticate(&md, None).await,
        Err(NodeAuthFailure::Credential(_))
    ));
}

fn outcome_count(metrics: &TokenReviewMetrics, outcome: &'static str) -> u64 {
    metrics
        .results
        .get_or_create(&membrane_ca::metrics::OutcomeLabels { outcome })
        .get()
}

/// Many callers presenting distinct unknown tokens at once: the API server never sees more
/// reviews in flight than the bound, and each call still gets its answer.
#[tokio::test]
async fn reviews_in_flight_are_bounded() {
    let mut setup = reviewer_setup();
    setup.review_delay = Some(Duration::from_millis(40));
    let (client, api) = FakeApi::start(setup);
    let metrics = TokenReviewMetrics::default();
    let config = TokenReviewConfig::default();
    let bound = config.max_in_flight;
    let auth = NodeAuthenticator::from(TokenReviewer::new(client, config, metrics.clone()));
    let calls: Vec<_> = (0..bound * 5)
        .map(|i| {
            let auth = auth.clone();
            tokio::spawn(async move {
                let token = format!("random-{i}-{:016x}", rand::random::<u64>());
                auth.node_for(&token).await
            })
        })
        .collect();
    for call in calls {
        let answer = tokio::time::timeout(WAIT, call)
            .await
            .expect("in time")
            .expect("joined");
        assert!(
            matches!(
                answer,
                Err(NodeAuthFailure::TokenReview(
                    TokenReviewError::Unauthenticated(_)
                ))
            ),
            "{answer:?}"
        );
    }
    let peak = api.reviews_peak();
    eprintln!(
        "{} concurrent unknown tokens: at most {peak} reviews in flight",
        bound * 5
    );
    assert!(peak <= bound, "{peak} reviews in flight, bound {bound}");
    assert!(peak > 1, "the reviews were not concurrent at all ({peak})");
    assert_eq!(outcome_count(&metrics, "unauthenticated"), 5 * bound as u64);

    // A bound too small for the load: who cannot get a turn within the timeout is refused
    // (UNAVAILABLE, so a ztunnel retries) and counted, without a review.
    let mut setup = reviewer_setup();
    setup.review_delay = Some(Duration::from_millis(300));
    let (client, api) = FakeApi::start(setup);
    let config = TokenReviewConfig {
        max_in_flight: 2,
        timeout: Duration::from_millis(400),
        ..TokenReviewConfig::default()
    };
    let metrics = TokenReviewMetrics::default();
    let auth = NodeAuthenticator::from(TokenReviewer::new(client, config, metrics.clone()));
    let call = |i: usize| {
        let auth = auth.clone();
        tokio::spawn(async move { auth.node_for(&format!("slow-{i}")).await })
    };
    // Two take the turns and give them back at 300 ms; eight more start waiting at 50 ms: two
    // get the freed turns (answered at 600 ms), six are still waiting at their deadline
    // (450 ms). Every margin is at least 100 ms.
    let mut calls: Vec<_> = (0..2).map(call).collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    calls.extend((2..10).map(call));
    let mut answers = Vec::new();
    for c in calls {
        answers.push(
            tokio::time::timeout(WAIT, c)
                .await
                .expect("in time")
                .expect("joined"),
        );
    }
    let busy = answers
        .iter()
        .filter(|a| matches!(a, Err(NodeAuthFailure::TokenReview(TokenReviewError::Busy))))
        .count();
    assert_eq!(busy, 6, "{answers:?}");
    assert_eq!(outcome_count(&metrics, "busy"), 6);
    let status = NodeAuthFailure::from(TokenReviewError::Busy).status();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(api.reviews_peak() <= 2);
}

/// One caller address presenting many unknown tokens at once has at most its share of the
/// reviews in flight (an eighth), and waits for its own turns: another address is reviewed
/// meanwhile, without waiting behind it; past the timeout its calls are refused as busy.
#[tokio::test]
async fn one_address_gets_its_share_of_reviews() {
    let mut setup = reviewer_setup();
    setup.review_delay = Some(Duration::from_millis(300));
    let (client, api) = FakeApi::start(setup);
    let metrics = TokenReviewMetrics::default();
    let config = TokenReviewConfig {
        timeout: Duration::from_millis(1500),
        ..TokenReviewConfig::default()
    };
    let reviewer = TokenReviewer::new(client, config, metrics.clone());
    let share = reviewer.max_in_flight_per_peer();
    assert_eq!(share, 4);
    let auth = NodeAuthenticator::from(reviewer);
    let attacker: std::net::SocketAddr = "10.0.0.66:40000".parse().expect("addr");
    let node: std::net::SocketAddr = "10.0.1.1:40000".parse().expect("addr");
    // 40 made-up tokens: 4 at a time, 300 ms each; the 1.5 s timeout lets about 20 through.
    let calls: Vec<_> = (0..40)
        .map(|i| {
            let auth = auth.clone();
            tokio::spawn(async move {
                auth.authenticate(&bearer(&format!("made-up-{i}")), Some(attacker))
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = std::time::Instant::now();
    let other = tokio::time::timeout(WAIT, auth.authenticate(&bearer("other-node"), Some(node)))
        .await
        .expect("in time");
    let waited = started.elapsed();
    assert!(
        matches!(
            other,
            Err(NodeAuthFailure::TokenReview(
                TokenReviewError::Unauthenticated(_)
            ))
        ),
        "{other:?}"
    );
    assert!(
        waited < Duration::from_millis(900),
        "the other address waited {waited:?} behind the first"
    );
    let mut busy = 0;
    for call in calls {
        let answer = tokio::time::timeout(WAIT, call)
            .await
            .expect("in time")
            .expect("joined");
        if matches!(
            answer,
            Err(NodeAuthFailure::TokenReview(TokenReviewError::Busy))
        ) {
            busy += 1;
        }
    }
    assert!((10..=36).contains(&busy), "{busy} refused as busy");
    assert_eq!(outcome_count(&metrics, "busy_peer"), busy as u64);
    assert!(api.reviews_peak() <= share + 1, "{}", api.reviews_peak());
}

/// A ztunnel presenting one new (good) token on many calls at once, from one address, has it
/// reviewed at most once per turn of its share, not once per call, and none is refused: the
/// calls wait for the address's turns and find the answer in memory.
#[tokio::test]
async fn one_new_token_on_many_calls_is_reviewed_once() {
    let mut setup = reviewer_setup();
    setup.review_delay = Some(Duration::from_millis(100));
    let (client, mut api) = FakeApi::start(setup);
    let metrics = TokenReviewMetrics::default();
    let auth = NodeAuthenticator::from(TokenReviewer::new(
        client,
        TokenReviewConfig::default(),
        metrics.clone(),
    ));
    let peer: std::net::SocketAddr = "10.0.1.2:40000".parse().expect("addr");
    let calls: Vec<_> = (0..12)
        .map(|_| {
            let auth = auth.clone();
            tokio::spawn(async move { auth.authenticate(&bearer("good"), Some(peer)).await })
        })
        .collect();
    for call in calls {
        let answer = tokio::time::timeout(WAIT, call)
            .await
            .expect("in time")
            .expect("joined");
        assert!(answer.is_ok(), "{answer:?}");
    }
    let reviews = api
        .seen_within(Duration::from_millis(200), |s| {
            s.path.ends_with("/tokenreviews")
        })
        .await
        .len();
    assert!(reviews <= 4, "{reviews} reviews of one token");
    assert_eq!(outcome_count(&metrics, "busy_peer"), 0);
}

/// A token the API server refused is answered from memory for the negative-cache window: it
/// reaches the API server once. A review that failed (API error) is not remembered.
#[tokio::test]
async fn a_refused_token_is_reviewed_once_within_the_window() {
    let (client, mut api) = FakeApi::start(reviewer_setup());
    let metrics = TokenReviewMetrics::default();
    let config = TokenReviewConfig {
        negative_cache_ttl: Duration::from_millis(500),
        ..TokenReviewConfig::default()
    };
    let auth = NodeAuthenticator::from(TokenReviewer::new(client, config, metrics.clone()));
    let reviews_of = |token: &'static str| {
        move |s: &Seen| s.path.ends_with("/tokenreviews") && s.body["spec"]["token"] == token
    };
    for _ in 0..5 {
        for token in ["forged", "wrong-sa"] {
            let refused = tokio::time::timeout(WAIT, auth.node_for(token))
                .await
                .expect("in time")
                .expect_err("refused");
            assert_eq!(refused.status().code(), tonic::Code::Unauthenticated);
        }
    }
    assert!(
        matches!(
            auth.node_for("wrong-sa").await,
            Err(NodeAuthFailure::TokenReview(
                TokenReviewError::WrongAccount { .. }
            ))
        ),
        "the remembered refusal is the same"
    );
    let seen = api
        .seen_within(Duration::from_millis(200), |s| {
            s.path.ends_with("/tokenreviews")
        })
        .await;
    let count = |token: &str| {
        seen.iter()
            .filter(|s| s.body["spec"]["token"] == token)
            .count()
    };
    assert_eq!(
        (count("forged"), count("wrong-sa")),
        (1, 1),
        "reviews of (forged, wrong-sa) within the window"
    );
    assert_eq!(outcome_count(&metrics, "cached_refusal"), 9);
    // After the window, the token is reviewed again.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(auth.node_for("forged").await.is_err());
    api.next_seen(reviews_of("forged")).await;
    // An API error is not an answer about the token: every try reaches the API server.
    for _ in 0..3 {
        assert!(auth.node_for("fail").await.is_err());
    }
    let failed = api
        .seen_within(Duration::from_millis(200), reviews_of("fail"))
        .await;
    assert_eq!(failed.len(), 3);
}

/// The whole controller in Kubernetes mode over a fake API serving `setup` (with
/// [`reviewer_setup`]'s tokens): state from the API, nodes authenticated by TokenReview.
struct Controller {
    running: membrane_ca::app::Running,
    api: FakeApi,
    td: membrane_identity::TrustDomain,
    endpoint: String,
    roots: String,
    _dir: tempfile::TempDir,
}

impl Controller {
    async fn start(mut setup: Setup) -> Self {
        use membrane_ca::app::{self, AppConfig, KubernetesMode, SourceMode};

        setup.reviews = reviewer_setup().reviews;
        let (client, api) = FakeApi::start(setup);
        let dir = tempfile::tempdir().expect("tempdir");
        let loopback: std::net::SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let td = membrane_identity::spiffe_id::parse_trust_domain("cluster.local").expect("td");
        let config = AppConfig {
            trust_domain: td.clone(),
            state_dir: dir.path().join("state"),
            plugin_ca_dir: None,
            root_ttl: Duration::from_secs(3600 * 24),
            source_dir: Default::default(),
            reload_interval: Duration::from_millis(100),
            tokens_file: Default::default(),
            listen: loopback,
            metrics_listen: loopback,
            server_names: Vec::new(),
            serving_cert_ttl: Duration::from_secs(3600),
            rotation_grace: Duration::from_secs(30),
            rotation_ack_timeout: Duration::from_secs(600),
            root_namespace: membrane_policy::DEFAULT_ROOT_NAMESPACE.to_owned(),
            pod_networks: Vec::new(),
            federation: Default::default(),
            signer: membrane_ca::SignerConfig::default(),
            listeners: Default::default(),
        };
        let mode = SourceMode::Kubernetes(Box::new(KubernetesMode {
            client,
            token_review: TokenReviewConfig::default(),
            status: status_config(15_000),
        }));
        let running = app::start_with(config, mode).await.expect("started");
        tokio::time::timeout(WAIT, running.ready())
            .await
            .expect("source synced");
        let endpoint = format!("https://{}", running.grpc_addr());
        let roots = running.bundle().to_pem();
        Self {
            running,
            api,
            td,
            endpoint,
            roots,
            _dir: dir,
        }
    }

    async fn connect(&self, token: &str) -> membrane_ca::client::CaClient {
        membrane_ca::client::CaClient::connect(
            &self.endpoint,
            self.roots.as_bytes(),
            "localhost",
            token,
        )
        .await
        .expect("connect")
    }

    fn identity(&self, ns: &str, sa: &str) -> membrane_identity::WorkloadIdentity {
        membrane_identity::WorkloadIdentity::new(&self.td, ns, sa).expect("id")
    }
}

fn refusal_code<T>(r: Result<T, membrane_ca::client::ClientError>) -> tonic::Code {
    match r {
        Err(membrane_ca::client::ClientError::Refused { code, .. }) => code,
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
}

/// Certificates are issued over real gRPC/TLS only to the node a pod runs on.
#[tokio::test]
async fn controller_in_kubernetes_mode_signs_for_the_reviewed_node() {
    use membrane_ca::client::ClientError;

    let controller = Controller::start(base_setup()).await;
    let connect = |token: &'static str| controller.connect(token);
    let trainer = controller.identity("training", "trainer");
    let (svid, _) = connect("good")
        .await
        .request_svid(&trainer, Duration::from_secs(600))
        .await
        .expect("node-a may have the trainer identity");
    assert_eq!(svid.identity(), &trainer);
    let code = refusal_code;
    let other = controller.identity("training", "default");
    let mut good = connect("good").await;
    assert_eq!(
        code(good.request_svid(&other, Duration::from_secs(600)).await),
        tonic::Code::PermissionDenied
    );
    assert_eq!(
        code(
            connect("forged")
                .await
                .request_svid(&trainer, Duration::from_secs(600))
                .await
        ),
        tonic::Code::Unauthenticated
    );
    assert_eq!(
        code(
            connect("fail")
                .await
                .request_svid(&trainer, Duration::from_secs(600))
                .await
        ),
        tonic::Code::Unavailable
    );
    // The pod moves to node-b: node-a loses the identity.
    controller.api.events(
        "pods",
        vec![(
            "MODIFIED",
            pod("training", "trainer-0", "node-b", "10.0.1.5"),
        )],
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match good.request_svid(&trainer, Duration::from_secs(600)).await {
            Err(ClientError::Refused { code, .. }) => {
                assert_eq!(code, tonic::Code::PermissionDenied);
                break;
            }
            Ok(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!(
                "node-a still signed for a pod on node-b: {:?}",
                other.map(|_| ())
            ),
        }
    }
    controller.running.shutdown().await;
}

/// A node may create mirror (static) pods bound to itself in any namespace; they have no
/// service account. One in a mesh namespace must not give the node `ns/<ns>/sa/default`.
#[tokio::test]
async fn a_mirror_pod_gives_its_node_no_identity() {
    let mut setup = base_setup();
    let mirror = |name: &str, ip: &str, annotated: bool| {
        let annotations = if annotated {
            json!({"kubernetes.io/config.mirror": "0f1e2d3c"})
        } else {
            json!({})
        };
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": "training", "uid": format!("uid-{name}"),
                            "annotations": annotations},
               "spec": {"nodeName": "node-a", "containers": [{"name": "c"}]},
               "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
    };
    setup.lists.insert(
        "pods",
        vec![
            pod("training", "trainer-0", "node-a", "10.0.0.5"),
            mirror("static-web-node-a", "10.0.0.6", true),
            // Without the annotation, an empty serviceAccountName is refused alike.
            mirror("no-account", "10.0.0.7", false),
        ],
    );
    let controller = Controller::start(setup).await;
    let mut node_a = controller.connect("good").await;
    node_a
        .request_svid(
            &controller.identity("training", "trainer"),
            Duration::from_secs(600),
        )
        .await
        .expect("the pods were listed: node-a may have the trainer identity");
    let default = controller.identity("training", "default");
    assert_eq!(
        refusal_code(
            node_a
                .request_svid(&default, Duration::from_secs(600))
                .await
        ),
        tonic::Code::PermissionDenied,
        "a mirror pod gave its node the namespace's default identity"
    );
    controller.running.shutdown().await;
}
