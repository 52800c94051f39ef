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
