//! An open discovery stream's credential, checked again while the stream runs (see the
//! module docs of [`super`]).

use tonic::Status;

use super::DiscoveryService;
use crate::metrics::RefusalReason;
use crate::tokenreview::Caller;

impl DiscoveryService {
    /// Checks an open stream's credential again: `Err` (the status that ends the stream) when
    /// the token is no longer accepted or now names another caller; a check that cannot be
    /// made keeps the stream.
    pub(super) async fn recheck(
        &self,
        node: &str,
        (token, caller): &(String, Caller),
    ) -> Result<(), Status> {
        let why = match self.auth.node_for(token).await {
            Ok(now) if now == *caller => return Ok(()),
            Ok(now) => format!("the credential now names node {:?}", now.node),
            Err(failure) if failure.refusal() == RefusalReason::AuthUnavailable => {
                tracing::debug!(node, error = %failure, "discovery stream's credential could not be checked again; kept");
                return Ok(());
            }
            Err(failure) if expired(token) => {
                // Not a revocation: a projected token the kubelet has since replaced. The
                // ztunnel reconnects with the one it holds now.
                tracing::info!(node, error = %failure, "discovery stream ended: its credential expired");
                return Err(self.refuse(
                    "credential_expired",
                    Status::unauthenticated(
                        "node credential expired; reconnect with the current one",
                    ),
                ));
            }
            Err(failure) => failure.to_string(),
        };
        tracing::warn!(
            node,
            reason = why,
            "discovery stream ended: its credential is no longer accepted"
        );
        Err(self.refuse(
            "credential_revoked",
            Status::unauthenticated(format!("node credential no longer accepted: {why}")),
        ))
    }
}

/// Whether `token` is a JWT whose `exp` has passed. Read without verifying: the token was
/// verified when the stream opened, and this only names why it is refused now.
fn expired(token: &str) -> bool {
    use base64::Engine;
    let Some(claims) = token.split('.').nth(1) else {
        return false;
    };
    let Ok(json) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(claims) else {
        return false;
    };
    let Some(exp) = serde_json::from_slice::<serde_json::Value>(&json)
        .ok()
        .and_then(|claims| claims.get("exp")?.as_i64())
    else {
        return false;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    exp <= now
}

#[cfg(test)]
mod tests {
    use base64::Engine;

    fn jwt(claims: &str) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.sig", b64(r#"{"alg":"RS256"}"#), b64(claims))
    }

    #[test]
    fn only_a_jwt_past_its_exp_is_expired() {
        assert!(super::expired(&jwt(r#"{"exp":1000}"#)));
        assert!(!super::expired(&jwt(r#"{"exp":99999999999}"#)));
        assert!(!super::expired(&jwt(r#"{"sub":"x"}"#)));
        assert!(!super::expired("node-a-bootstrap-token"));
        assert!(!super::expired("a.!!!.c"));
    }
}
