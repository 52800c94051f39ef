//! A fake Kubernetes API server behind `tower_test::mock::pair`, for the `kube_source`
//! tests (and the source started over it, [`start_source`]): LIST with a `resourceVersion`, WATCH as newline-separated JSON events (a watch
//! response ends after the events a test sends, as an API server's watch timeout would; the
//! watcher then re-watches from the last version), status PATCH, Lease GET/POST/PUT (kept in
//! memory) and TokenReview POST (answered after [`Setup::review_delay`], with the most
//! reviews ever in flight at once kept: [`FakeApi::reviews_peak`]). Every non-watch request
//! is recorded.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use membrane_ca::metrics::SourceMetrics;
use membrane_ca::source::ClusterState;
use membrane_ca::source::kube::{self as ksource, KubeSourceConfig, ReportReceiver};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tower_test::mock;

use super::WAIT;

type Handle = mock::Handle<Request<Body>, Response<Body>>;
type Reply = mock::SendResponse<Response<Body>>;

/// A request the fake API server answered (watches are not recorded).
#[derive(Debug, Clone)]
pub struct Seen {
    /// HTTP method.
    pub method: String,
    /// URI path.
    pub path: String,
    /// JSON body (`null` when empty).
    pub body: Value,
}

enum Cmd {
    /// Watch events (`type`, object) for a resource.
    Events(&'static str, Vec<(&'static str, Value)>),
    /// Answers a held LIST.
    ReleaseList(&'static str),
}

/// What the fake API server starts with.
#[derive(Default)]
pub struct Setup {
    pub lists: HashMap<&'static str, Vec<Value>>,
    /// Resources whose LIST is held until [`FakeApi::release_list`].
    pub held: Vec<&'static str>,
    pub lease: Option<Value>,
    /// Whether the Gateway API's CRDs are installed (else their paths are 404).
    pub gateway_api: bool,
    /// TokenReview `status` by token; an unknown token is not authenticated. The token
    /// `"fail"` gets HTTP 500.
    pub reviews: HashMap<String, Value>,
    /// How long each TokenReview takes to answer (none: at once).
    pub review_delay: Option<Duration>,
}

/// TokenReviews being answered now, and the most ever at once.
#[derive(Default)]
struct ReviewLoad {
    now: AtomicUsize,
    peak: AtomicUsize,
}

pub struct FakeApi {
    cmds: mpsc::UnboundedSender<Cmd>,
    seen: mpsc::UnboundedReceiver<Seen>,
    reviews: Arc<ReviewLoad>,
}

fn resource_of(path: &str) -> Option<&'static str> {
    Some(match path {
        "/api/v1/namespaces" => "namespaces",
        "/api/v1/pods" => "pods",
        "/api/v1/serviceaccounts" => "serviceaccounts",
        "/api/v1/services" => "services",
        "/apis/discovery.k8s.io/v1/endpointslices" => "endpointslices",
        "/apis/security.membrane.dev/v1/authorizationpolicies" => "authorizationpolicies",
        "/apis/security.membrane.dev/v1/egresspolicies" => "egresspolicies",
        "/apis/gateway.networking.k8s.io/v1/gateways" => "gateways",
        "/apis/gateway.networking.k8s.io/v1alpha2/tcproutes" => "tcproutes",
        "/apis/gateway.networking.k8s.io/v1alpha2/tlsroutes" => "tlsroutes",
        _ => return None,
    })
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(body).expect("json")))
        .expect("response")
}

pub fn api_status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": reason, "reason": reason, "code": code})
}

struct Router {
    setup: Setup,
    rv: u64,
    held_lists: HashMap<&'static str, Reply>,
    watches: HashMap<&'static str, Reply>,
    queued: HashMap<&'static str, Vec<String>>,
    seen: mpsc::UnboundedSender<Seen>,
    reviews: Arc<ReviewLoad>,
}

impl Router {
    fn stamp(&mut self, mut obj: Value) -> Value {
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        obj
    }

    fn list(&mut self, resource: &'static str, reply: Reply) {
        let items: Vec<Value> = self.setup.lists.get(resource).cloned().unwrap_or_default();
        let items: Vec<Value> = items.into_iter().map(|o| self.stamp(o)).collect();
        self.rv += 1;
        let body = json!({"kind": "List", "apiVersion": "v1",
                          "metadata": {"resourceVersion": self.rv.to_string()}, "items": items});
        reply.send_response(json_response(StatusCode::OK, &body));
    }

    fn flush(&mut self, resource: &'static str) {
        if self.queued.get(resource).is_none_or(Vec::is_empty) {
            return;
        }
        let Some(reply) = self.watches.remove(resource) else {
            return;
        };
        let lines = self.queued.remove(resource).unwrap_or_default();
        let body = lines.join("\n") + "\n";
        reply.send_response(
            Response::builder()
                .status(StatusCode::OK)
                .body(Body::from(body.into_bytes()))
                .expect("response"),
        );
    }

    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Events(resource, events) => {
                for (kind, obj) in events {
                    let obj = if kind == "ERROR" {
                        obj
                    } else {
                        self.stamp(obj)
                    };
                    let line = json!({"type": kind, "object": obj}).to_string();
                    self.queued.entry(resource).or_default().push(line);
                }
                self.flush(resource);
            }
            Cmd::ReleaseList(resource) => {
                self.setup.held.retain(|r| *r != resource);
                if let Some(reply) = self.held_lists.remove(resource) {
                    self.list(resource, reply);
                }
            }
        }
    }

    async fn request(&mut self, req: Request<Body>, reply: Reply) {
        let method = req.method().as_str().to_owned();
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or_default().to_owned();
        let served = |r: &&'static str| {
            self.setup.gateway_api || !["gateways", "tcproutes", "tlsroutes"].contains(r)
        };
        if let Some(resource) = resource_of(&path).filter(served) {
            if query.split('&').any(|q| q == "watch=true") {
                self.watches.insert(resource, reply);
                self.flush(resource);
            } else if self.setup.held.contains(&resource) {
                self.held_lists.insert(resource, reply);
            } else {
                self.list(resource, reply);
            }
            return;
        }
        let bytes = req.into_body().collect_bytes().await.unwrap_or_default();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let _ = self.seen.send(Seen {
            method: method.clone(),
            path: path.clone(),
            body: body.clone(),
        });
        let response = if path.ends_with("/status") && method == "PATCH" {
            let parts: Vec<&str> = path.split('/').collect();
            let obj = json!({"apiVersion": "security.membrane.dev/v1",
                "kind": "AuthorizationPolicy",
                "metadata": {"namespace": parts[5], "name": parts[7]},
                "spec": {}, "status": body["status"]});
            json_response(StatusCode::OK, &self.stamp(obj))
        } else if path.contains("/leases") {
            match (method.as_str(), &self.setup.lease) {
                ("GET", None) => json_response(StatusCode::NOT_FOUND, &api_status(404, "NotFound")),
                ("GET", Some(lease)) => json_response(StatusCode::OK, lease),
                ("POST" | "PUT", _) => {
                    let lease = self.stamp(body);
                    self.setup.lease = Some(lease.clone());
                    json_response(StatusCode::OK, &lease)
                }
                _ => json_response(StatusCode::NOT_FOUND, &api_status(404, "NotFound")),
            }
        } else if path == "/apis/authentication.k8s.io/v1/tokenreviews" {
            let token = body["spec"]["token"].as_str().unwrap_or_default();
            if token == "fail" {
                json_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &api_status(500, "InternalError"),
                )
            } else {
                let status = self.setup.reviews.get(token).cloned().unwrap_or_else(
                    || json!({"authenticated": false, "error": "invalid bearer token"}),
                );
                let mut review = body.clone();
                review["status"] = status;
                let response = json_response(StatusCode::CREATED, &review);
                if let Some(delay) = self.setup.review_delay {
                    let load = self.reviews.clone();
                    let now = load.now.fetch_add(1, Ordering::SeqCst) + 1;
                    load.peak.fetch_max(now, Ordering::SeqCst);
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        load.now.fetch_sub(1, Ordering::SeqCst);
                        reply.send_response(response);
                    });
                    return;
                }
                response
            }
        } else {
            json_response(StatusCode::NOT_FOUND, &api_status(404, "NotFound"))
        };
        reply.send_response(response);
    }
}

impl FakeApi {
    pub fn start(setup: Setup) -> (Client, Self) {
        let (service, mut handle): (_, Handle) = mock::pair();
        let (cmds, mut cmd_rx) = mpsc::unbounded_channel();
        let (seen_tx, seen) = mpsc::unbounded_channel();
        let reviews = Arc::new(ReviewLoad::default());
        let mut router = Router {
            setup,
            rv: 100,
            held_lists: HashMap::new(),
            watches: HashMap::new(),
            queued: HashMap::new(),
            seen: seen_tx,
            reviews: reviews.clone(),
        };
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    req = handle.next_request() => {
                        let Some((req, reply)) = req else { return };
                        router.request(req, reply).await;
                    }
                    cmd = cmd_rx.recv() => {
                        let Some(cmd) = cmd else { return };
                        router.command(cmd);
                    }
                }
            }
        });
        (
            Client::new(service, "default"),
            Self {
                cmds,
                seen,
                reviews,
            },
        )
    }

    /// The most TokenReviews ever being answered at once.
    pub fn reviews_peak(&self) -> usize {
        self.reviews.peak.load(Ordering::SeqCst)
    }

    pub fn events(&self, resource: &'static str, events: Vec<(&'static str, Value)>) {
        self.cmds
            .send(Cmd::Events(resource, events))
            .expect("router");
    }

    pub fn release_list(&self, resource: &'static str) {
        self.cmds.send(Cmd::ReleaseList(resource)).expect("router");
    }

    /// The next recorded request matching `pred`, skipping others.
    pub async fn next_seen(&mut self, pred: impl Fn(&Seen) -> bool) -> Seen {
        tokio::time::timeout(WAIT, async {
            loop {
                let seen = self.seen.recv().await.expect("router alive");
                if pred(&seen) {
                    return seen;
                }
            }
        })
        .await
        .expect("expected request not seen in time")
    }

    /// Every recorded request matching `pred` within `window`.
    pub async fn seen_within(
        &mut self,
        window: Duration,
        pred: impl Fn(&Seen) -> bool,
    ) -> Vec<Seen> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + window;
        while let Ok(Some(seen)) = tokio::time::timeout_at(deadline, self.seen.recv()).await {
            if pred(&seen) {
                out.push(seen);
            }
        }
        out
    }
}

/// The Kubernetes source running against a [`FakeApi`]; dropping it stops the source.
pub struct Source {
    /// The fake API server.
    pub api: FakeApi,
    /// The client the source uses.
    pub client: Client,
    /// The states it publishes.
    pub state: watch::Receiver<Option<Arc<ClusterState>>>,
    /// Its per-policy reports.
    pub reports: ReportReceiver,
    /// Its metrics.
    pub metrics: SourceMetrics,
    /// Cancelled on drop; tasks tied to the source use it too.
    pub cancel: CancellationToken,
}

impl Drop for Source {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Starts the Kubernetes source (default configuration) over a fake API serving `setup`.
pub fn start_source(setup: Setup) -> Source {
    let (client, api) = FakeApi::start(setup);
    let (tx, state) = watch::channel(None);
    let (reports_tx, reports) = watch::channel(None);
    let metrics = SourceMetrics::default();
    let cancel = CancellationToken::new();
    tokio::spawn(ksource::run(
        client.clone(),
        KubeSourceConfig::default(),
        tx,
        reports_tx,
        metrics.clone(),
        cancel.clone(),
    ));
    Source {
        api,
        client,
        state,
        reports,
        metrics,
        cancel,
    }
}
