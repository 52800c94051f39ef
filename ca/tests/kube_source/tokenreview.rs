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
    let node = tokio::time::timeout(WAIT, auth.authenticate(&bearer("good")))
        .await
        .expect("in time");
    assert_eq!(node, Ok(Caller::node("node-a")));
    let review = api.next_seen(|s| s.path.ends_with("/tokenreviews")).await;
    assert_eq!(review.method, "POST");
    assert_eq!(review.body["spec"]["token"], "good");
    assert_eq!(review.body["spec"]["audiences"], json!(["membrane-ca"]));
    // Served from the cache: no second review.
    let node = auth.authenticate(&bearer("good")).await;
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
    let caller = tokio::time::timeout(WAIT, auth.authenticate(&bearer("gateway")))
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
    let node = tokio::time::timeout(WAIT, auth.authenticate(&bearer("good")))
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
            tokio::time::timeout(WAIT, auth.authenticate(&bearer(token)))
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
        auth.authenticate(&md).await,
        Err(NodeAuthFailure::Credential(_))
    ));
}

/// The whole controller in Kubernetes mode: state from the (fake) API, nodes authenticated by
/// TokenReview, certificates issued over real gRPC/TLS only to the node a pod runs on.
#[tokio::test]
async fn controller_in_kubernetes_mode_signs_for_the_reviewed_node() {
    use membrane_ca::app::{self, AppConfig, KubernetesMode, SourceMode};
    use membrane_ca::client::{CaClient, ClientError};
    use membrane_identity::WorkloadIdentity;

    let mut setup = base_setup();
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
    let connect = |token: &'static str| {
        let (endpoint, roots) = (endpoint.clone(), roots.clone());
        async move {
            CaClient::connect(&endpoint, roots.as_bytes(), "localhost", token)
                .await
                .expect("connect")
        }
    };
    let trainer = WorkloadIdentity::new(&td, "training", "trainer").expect("id");
    let (svid, _) = connect("good")
        .await
        .request_svid(&trainer, Duration::from_secs(600))
        .await
        .expect("node-a may have the trainer identity");
    assert_eq!(svid.identity(), &trainer);
    let code = |r: Result<_, ClientError>| match r {
        Err(ClientError::Refused { code, .. }) => code,
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    };
    let other = WorkloadIdentity::new(&td, "training", "default").expect("id");
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
    api.events(
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
    running.shutdown().await;
}
