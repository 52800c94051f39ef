//! Node authentication: which node is calling, from a bootstrap token (directory mode) or
//! from the ztunnel's projected ServiceAccount token checked with a Kubernetes TokenReview.
//!
//! Kubernetes mode (DESIGN §3): the ztunnel sends its bound service account token as
//! `authorization: Bearer <token>`, requested for the controller's audience (`membrane-ca` by
//! default). The controller creates an `authentication.k8s.io/v1` TokenReview with that
//! audience and accepts the token only if the API server says
//!
//! 1. `authenticated: true`, with the audience echoed in `status.audiences` (an API server
//!    that ignores audiences would otherwise accept a token minted for anything else);
//! 2. user `system:serviceaccount:<ns>:<sa>` is one of the configured ztunnel accounts
//!    (`membrane-system/ztunnel` by default);
//! 3. `user.extra["authentication.kubernetes.io/node-name"]` names exactly one node: bound
//!    pod tokens carry it (Kubernetes ≥ 1.30). A token without it — a legacy Secret token, a
//!    token not bound to a pod — is refused: it says nothing about where it runs.
//!
//! The node name is the same result the bootstrap token gives, and node authorization
//! ([`crate::node_auth::authorize`]) follows unchanged. A token of a configured *gateway*
//! account (`--gateway-service-account`) names its pod's node too, but its [`Caller`] may
//! obtain only that account's identity, for a gateway pod on that node
//! ([`crate::node_auth::authorize_gateway`]), and its discovery acknowledgements are booked
//! apart from the node's ztunnel. Positive results are cached for
//! [`TokenReviewConfig::cache_ttl`] (30 s) by SHA-256 of the token, so a node renewing many
//! certificates costs one review; a revoked token may therefore be honoured for up to that
//! long. Refusals the API server decided (not authenticated, wrong account, no node binding)
//! are cached for [`TokenReviewConfig::negative_cache_ttl`] (10 s), so repeating a bad token
//! does not reach the API server again; a failed review (API unreachable) is never cached.
//! An API server that cannot be reached (or refuses the controller itself) gives
//! [`TokenReviewError::Unavailable`] → gRPC `UNAVAILABLE`, so a ztunnel retries instead of
//! giving up on a credential that may be fine.
//!
//! Anyone who reaches the controller can present tokens, and each unseen one costs a review:
//! at most [`TokenReviewConfig::max_in_flight`] (32) reviews are in flight at once, for every
//! caller of the process (`Sign`, `Watch`, `Ack`). A call waits for a turn up to
//! [`TokenReviewConfig::timeout`]; past that it is refused with [`TokenReviewError::Busy`] →
//! `UNAVAILABLE` and counted (`membrane_ca_tokenreview_results_total{outcome="busy"}`). One
//! caller address may have at most an eighth of them (at least one) in flight: its calls wait
//! for one of its own turns first (within the same timeout, else `outcome="busy_peer"`), so a
//! pod presenting an endless stream of made-up tokens uses its own share, not every node's
//! turn, while a ztunnel presenting one new token on many calls at once has it reviewed at
//! most once per turn of its share and the rest answered from memory.

mod cache;

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::Semaphore;

use self::cache::{Expiring, sha256};

use crate::metrics::{RefusalReason, TokenReviewMetrics};
use crate::node_auth::BootstrapTokens;
use crate::token_file::TokenSet;

/// The `user.extra` key that carries the node of a bound pod token.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// Default audience of the ztunnel's projected token.
pub const DEFAULT_AUDIENCE: &str = "membrane-ca";
/// Default ztunnel service account (`namespace/name`).
pub const DEFAULT_ZTUNNEL_ACCOUNT: &str = "membrane-system/ztunnel";
/// Longest token sent for review (projected tokens are about 1 KiB).
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Most cached positive results.
const CACHE_CAPACITY: usize = 4096;
/// Most cached refusals.
const NEGATIVE_CACHE_CAPACITY: usize = 4096;
/// Default bound on TokenReviews in flight.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 32;

/// How tokens are reviewed.
#[derive(Debug, Clone)]
pub struct TokenReviewConfig {
    /// Audience the token must be issued for.
    pub audience: String,
    /// Service accounts (`namespace`, `name`) whose tokens identify nodes.
    pub ztunnel_accounts: Vec<(String, String)>,
    /// Service accounts of gateway pods: a token of one identifies its pod's node but may
    /// obtain only that account's own identity, for a gateway pod ([`Caller::gateway`]).
    pub gateway_accounts: Vec<(String, String)>,
    /// How long a positive result is reused.
    pub cache_ttl: Duration,
    /// How long a refusal decided by the API server is reused (zero: never).
    pub negative_cache_ttl: Duration,
    /// Deadline of one TokenReview call, and the longest a call waits for a turn.
    pub timeout: Duration,
    /// Most TokenReviews in flight at once (at least 1).
    pub max_in_flight: usize,
}

impl Default for TokenReviewConfig {
    fn default() -> Self {
        Self {
            audience: DEFAULT_AUDIENCE.to_owned(),
            ztunnel_accounts: vec![("membrane-system".to_owned(), "ztunnel".to_owned())],
            gateway_accounts: Vec::new(),
            cache_ttl: Duration::from_secs(30),
            negative_cache_ttl: Duration::from_secs(10),
            timeout: Duration::from_secs(5),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        }
    }
}

/// Parses `namespace/name` (the `--ztunnel-service-account` flag).
pub fn parse_account(text: &str) -> Result<(String, String), String> {
    let (ns, sa) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?}: expected <namespace>/<service-account>"))?;
    membrane_identity::spiffe_id::validate_namespace(ns).map_err(|e| format!("{text:?}: {e}"))?;
    membrane_identity::spiffe_id::validate_service_account(sa)
        .map_err(|e| format!("{text:?}: {e}"))?;
    Ok((ns.to_owned(), sa.to_owned()))
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenReviewError {
    /// The API server did not authenticate the token (or not for our audience).
    #[error("token not authenticated: {0}")]
    Unauthenticated(String),
    /// A valid token of a service account that is not a ztunnel's.
    #[error("{username} is not a ztunnel service account")]
    WrongAccount {
        /// The token's user.
        username: String,
    },
    /// A ztunnel token that is not bound to a pod on a node.
    #[error(
        "the token of {username} names no node (no {NODE_NAME_EXTRA}); mount a projected \
         service account token"
    )]
    NoNodeBinding {
        /// The token's user.
        username: String,
    },
    /// The TokenReview could not be made.
    #[error("cannot review the token with the Kubernetes API: {0}")]
    Unavailable(String),
    /// Too many reviews were in flight for the whole wait: the token was not looked at.
    #[error("too many node credentials are being reviewed; retry")]
    Busy,
}

impl TokenReviewError {
    /// The metric outcome label.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::Unauthenticated(_) => "unauthenticated",
            Self::WrongAccount { .. } => "wrong_account",
            Self::NoNodeBinding { .. } => "no_node_binding",
            Self::Unavailable(_) => "unavailable",
            Self::Busy => "busy",
        }
    }

    /// Whether the API server decided it (so the same token gets the same answer again), as
    /// opposed to a review that could not be made.
    fn decided(&self) -> bool {
        !matches!(self, Self::Unavailable(_) | Self::Busy)
    }
}

/// Who called: the node its credential names and, for a gateway pod's token, the only
/// identity (`namespace`, `service account`) it may obtain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The node.
    pub node: String,
    /// `Some` for a gateway account's token: only this identity, and only for a gateway pod.
    pub gateway: Option<(String, String)>,
}

impl Caller {
    /// A node agent's credential (a bootstrap token, a ztunnel account's token).
    pub fn node(node: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            gateway: None,
        }
    }
}

/// Checks ztunnel tokens with TokenReview.
pub struct TokenReviewer {
    api: Api<TokenReview>,
    config: TokenReviewConfig,
    usernames: BTreeSet<String>,
    gateway_usernames: HashMap<String, (String, String)>,
    cache: Expiring<Caller>,
    refused: Expiring<TokenReviewError>,
    in_flight: Semaphore,
    /// Each caller address's turns (its share of the reviews in flight) and how many calls
    /// from it hold or wait for one (the entry goes when none does).
    per_peer: Arc<std::sync::Mutex<HashMap<IpAddr, PeerTurns>>>,
    metrics: TokenReviewMetrics,
}

/// One caller address's turns.
#[derive(Debug)]
struct PeerTurns {
    turns: Arc<Semaphore>,
    users: usize,
}

/// A call from a caller address holding (or waiting for) one of its turns; leaves the entry
/// when dropped.
struct PeerUser {
    peer: IpAddr,
    turns: Arc<Semaphore>,
    map: Arc<std::sync::Mutex<HashMap<IpAddr, PeerTurns>>>,
}

impl Drop for PeerUser {
    fn drop(&mut self) {
        let mut map = membrane_runtime::lock(&self.map);
        if let Some(entry) = map.get_mut(&self.peer) {
            entry.users -= 1;
            if entry.users == 0 {
                map.remove(&self.peer);
            }
        }
    }
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("audience", &self.config.audience)
            .field("accounts", &self.usernames)
            .finish()
    }
}

impl TokenReviewer {
    /// A reviewer calling the API through `client`.
    pub fn new(client: Client, config: TokenReviewConfig, metrics: TokenReviewMetrics) -> Self {
        let usernames = config
            .ztunnel_accounts
            .iter()
            .map(|(ns, sa)| format!("system:serviceaccount:{ns}:{sa}"))
            .collect();
        let gateway_usernames = config
            .gateway_accounts
            .iter()
            .map(|(ns, sa)| {
                (
                    format!("system:serviceaccount:{ns}:{sa}"),
                    (ns.clone(), sa.clone()),
                )
            })
            .collect();
        Self {
            api: Api::all(client),
            usernames,
            gateway_usernames,
            cache: Expiring::new(CACHE_CAPACITY),
            refused: Expiring::new(NEGATIVE_CACHE_CAPACITY),
            in_flight: Semaphore::new(config.max_in_flight.max(1)),
            per_peer: Arc::default(),
            config,
            metrics,
        }
    }

    /// Reviews one caller address may have in flight.
    pub fn max_in_flight_per_peer(&self) -> usize {
        (self.config.max_in_flight / 8).max(1)
    }

    /// Joins the calls from `peer` that hold or wait for one of its turns.
    fn peer_user(&self, peer: IpAddr) -> PeerUser {
        let share = self.max_in_flight_per_peer();
        let mut map = membrane_runtime::lock(&self.per_peer);
        let entry = map.entry(peer).or_insert_with(|| PeerTurns {
            turns: Arc::new(Semaphore::new(share)),
            users: 0,
        });
        entry.users += 1;
        PeerUser {
            peer,
            turns: entry.turns.clone(),
            map: self.per_peer.clone(),
        }
    }

    /// The caller `token` belongs to.
    pub async fn node_for(&self, token: &str) -> Result<Caller, TokenReviewError> {
        self.node_for_from(token, None).await
    }

    /// The caller `token`, presented from `peer`, belongs to; a token not remembered is
    /// reviewed only within the peer's share of the reviews in flight.
    pub async fn node_for_from(
        &self,
        token: &str,
        peer: Option<IpAddr>,
    ) -> Result<Caller, TokenReviewError> {
        if token.is_empty() || token.len() > MAX_TOKEN_LEN {
            self.metrics.result("unauthenticated");
            return Err(TokenReviewError::Unauthenticated(
                "empty or oversized token".to_owned(),
            ));
        }
        let digest = sha256(token);
        if let Some(answer) = self.remembered(&digest) {
            return answer;
        }
        // One address waits for one of its own turns first (the same token presented by
        // several calls at once is then answered from memory after the first review), so it
        // never holds more than its share of the process's turns.
        let mut _peer_turn = None;
        if let Some(peer) = peer {
            let user = self.peer_user(peer);
            let Ok(Ok(turn)) =
                tokio::time::timeout(self.config.timeout, user.turns.clone().acquire_owned()).await
            else {
                self.metrics.result("busy_peer");
                tracing::debug!(
                    %peer,
                    limit = self.max_in_flight_per_peer(),
                    "node credential not reviewed: this address had its share of TokenReviews in flight for too long"
                );
                return Err(TokenReviewError::Busy);
            };
            _peer_turn = Some((turn, user));
            if let Some(answer) = self.remembered(&digest) {
                return answer;
            }
        }
        let Ok(Ok(_turn)) =
            tokio::time::timeout(self.config.timeout, self.in_flight.acquire()).await
        else {
            self.metrics.result(TokenReviewError::Busy.outcome());
            tracing::debug!(
                limit = self.config.max_in_flight,
                "node credential not reviewed: too many TokenReviews in flight"
            );
            return Err(TokenReviewError::Busy);
        };
        // Another call may have reviewed the same token while this one waited.
        if let Some(answer) = self.remembered(&digest) {
            return answer;
        }
        match self.review(token).await {
            Ok(node) => {
                self.metrics.result("authenticated");
                self.cache
                    .insert(digest, node.clone(), self.config.cache_ttl);
                Ok(node)
            }
            Err(e) => {
                self.metrics.result(e.outcome());
                if let TokenReviewError::Unavailable(reason) = &e {
                    tracing::warn!(error = %reason, "TokenReview failed; node credential not checked");
                }
                if e.decided() {
                    self.refused
                        .insert(digest, e.clone(), self.config.negative_cache_ttl);
                }
                Err(e)
            }
        }
    }

    /// A remembered answer for the token with `digest` (counted), if any.
    fn remembered(&self, digest: &cache::Digest) -> Option<Result<Caller, TokenReviewError>> {
        if let Some(node) = self.cache.get(digest) {
            self.metrics.result("cached");
            return Some(Ok(node));
        }
        let refused = self.refused.get(digest)?;
        self.metrics.result("cached_refusal");
        Some(Err(refused))
    }

    async fn review(&self, token: &str) -> Result<Caller, TokenReviewError> {
        let request = TokenReview {
            spec: TokenReviewSpec {
                audiences: Some(vec![self.config.audience.clone()]),
                token: Some(token.to_owned()),
            },
            ..Default::default()
        };
        let params = PostParams::default();
        let call = self.api.create(&params, &request);
        let review = match tokio::time::timeout(self.config.timeout, call).await {
            Err(_) => {
                return Err(TokenReviewError::Unavailable(format!(
                    "no answer within {:?}",
                    self.config.timeout
                )));
            }
            Ok(Err(e)) => return Err(TokenReviewError::Unavailable(e.to_string())),
            Ok(Ok(review)) => review,
        };
        let status = review.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let reason = status
                .error
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "rejected by the API server".to_owned());
            return Err(TokenReviewError::Unauthenticated(reason));
        }
        let audiences = status.audiences.unwrap_or_default();
        if !audiences.contains(&self.config.audience) {
            return Err(TokenReviewError::Unauthenticated(format!(
                "not issued for audience {:?}",
                self.config.audience
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let gateway = self.gateway_usernames.get(&username).cloned();
        if gateway.is_none() && !self.usernames.contains(&username) {
            return Err(TokenReviewError::WrongAccount { username });
        }
        let nodes = user
            .extra
            .unwrap_or_default()
            .remove(NODE_NAME_EXTRA)
            .unwrap_or_default();
        match nodes.as_slice() {
            [node] if !node.is_empty() => Ok(Caller {
                node: node.clone(),
                gateway,
            }),
            _ => Err(TokenReviewError::NoNodeBinding { username }),
        }
    }
}

/// How the controller learns which node is calling.
#[derive(Debug, Clone)]
pub enum NodeAuthenticator {
    /// Bootstrap tokens from a file (directory mode), replaced when the file changes.
    Bootstrap(TokenSet),
    /// Projected ServiceAccount tokens checked with TokenReview (Kubernetes mode).
    Kubernetes(Arc<TokenReviewer>),
}

impl From<BootstrapTokens> for NodeAuthenticator {
    fn from(tokens: BootstrapTokens) -> Self {
        Self::Bootstrap(TokenSet::new(tokens))
    }
}

impl From<TokenSet> for NodeAuthenticator {
    fn from(tokens: TokenSet) -> Self {
        Self::Bootstrap(tokens)
    }
}

impl From<TokenReviewer> for NodeAuthenticator {
    fn from(reviewer: TokenReviewer) -> Self {
        Self::Kubernetes(Arc::new(reviewer))
    }
}

/// Why a caller is not known as a node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NodeAuthFailure {
    /// No usable `authorization: Bearer` metadata.
    #[error("{0}")]
    Credential(&'static str),
    /// A bootstrap token that is not in the token file.
    #[error("unknown token")]
    UnknownToken,
    /// Refused by TokenReview (or TokenReview could not be made).
    #[error(transparent)]
    TokenReview(#[from] TokenReviewError),
}

impl NodeAuthFailure {
    /// The refusal reason counted in `membrane_ca_csr_refused_total`.
    pub fn refusal(&self) -> RefusalReason {
        match self {
            Self::TokenReview(TokenReviewError::Unavailable(_) | TokenReviewError::Busy) => {
                RefusalReason::AuthUnavailable
            }
            _ => RefusalReason::Unauthenticated,
        }
    }

    /// The gRPC status for the caller: `UNAVAILABLE` when the credential could not be
    /// checked, `UNAUTHENTICATED` otherwise.
    pub fn status(&self) -> tonic::Status {
        match self {
            Self::TokenReview(TokenReviewError::Unavailable(_)) => {
                tonic::Status::unavailable("the node credential cannot be checked right now; retry")
            }
            Self::TokenReview(TokenReviewError::Busy) => tonic::Status::unavailable(
                "too many node credentials are being checked right now; retry",
            ),
            other => tonic::Status::unauthenticated(format!("node credential refused: {other}")),
        }
    }
}

/// The token of a call's `authorization: Bearer <token>` metadata.
pub fn bearer_token(metadata: &tonic::metadata::MetadataMap) -> Result<&str, &'static str> {
    let value = metadata
        .get("authorization")
        .ok_or("no authorization metadata")?
        .to_str()
        .map_err(|_| "authorization metadata is not ASCII")?;
    let token = value
        .strip_prefix("Bearer ")
        .ok_or("authorization metadata is not a Bearer token")?;
    Ok(token.trim())
}

impl NodeAuthenticator {
    /// The node named by the call's `authorization: Bearer <token>` metadata.
    pub async fn authenticate(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        peer: Option<std::net::SocketAddr>,
    ) -> Result<Caller, NodeAuthFailure> {
        let token = bearer_token(metadata).map_err(NodeAuthFailure::Credential)?;
        match self {
            Self::Kubernetes(reviewer) => {
                Ok(reviewer.node_for_from(token, peer.map(|p| p.ip())).await?)
            }
            Self::Bootstrap(_) => self.node_for(token).await,
        }
    }

    /// The caller a bare token belongs to.
    pub async fn node_for(&self, token: &str) -> Result<Caller, NodeAuthFailure> {
        match self {
            Self::Bootstrap(tokens) => tokens
                .current()
                .node_for(token)
                .map(Caller::node)
                .ok_or(NodeAuthFailure::UnknownToken),
            Self::Kubernetes(reviewer) => Ok(reviewer.node_for(token).await?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_parse() {
        assert_eq!(
            parse_account(DEFAULT_ZTUNNEL_ACCOUNT),
            Ok(("membrane-system".to_owned(), "ztunnel".to_owned()))
        );
        for bad in ["ztunnel", "a/b/c", "/ztunnel", "Ns/sa", "ns/"] {
            assert!(parse_account(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn failures_map_to_grpc_codes() {
        for unavailable in [
            NodeAuthFailure::from(TokenReviewError::Unavailable("down".into())),
            NodeAuthFailure::from(TokenReviewError::Busy),
        ] {
            assert_eq!(unavailable.status().code(), tonic::Code::Unavailable);
            assert_eq!(unavailable.refusal(), RefusalReason::AuthUnavailable);
        }
        for refused in [
            NodeAuthFailure::UnknownToken,
            NodeAuthFailure::Credential("no authorization metadata"),
            TokenReviewError::Unauthenticated("x".into()).into(),
            TokenReviewError::WrongAccount {
                username: "system:serviceaccount:a:b".into(),
            }
            .into(),
            TokenReviewError::NoNodeBinding {
                username: "system:serviceaccount:a:b".into(),
            }
            .into(),
        ] {
            assert_eq!(refused.status().code(), tonic::Code::Unauthenticated);
            assert_eq!(refused.refusal(), RefusalReason::Unauthenticated);
        }
    }
}
