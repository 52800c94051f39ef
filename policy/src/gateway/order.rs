//! Which of two routes keeps a server name or a listener both claim, as the Gateway API
//! resolves conflicts: the older route by `metadata.creationTimestamp`, then by
//! `namespace/name`.
//!
//! Kubernetes sets every object's creation time, so there the order is the Gateway API's. A
//! manifest directory usually has none: a route whose document carries a
//! `metadata.creationTimestamp` (RFC 3339, UTC, as Kubernetes writes it) is ordered by it; a
//! route without one comes after every route with one, and routes without one are ordered by
//! `namespace/name` (then kind: a `TCPRoute` before a `TLSRoute` of the same name), so the same
//! files always give the same table, whatever order they were read in.

use std::cmp::Ordering;
use std::time::SystemTime;

use super::Route;

/// Reads a `metadata.creationTimestamp` (`2024-05-01T12:00:00Z`, fractional seconds allowed).
pub fn parse_created(text: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339(text)
        .map_err(|e| format!("{text:?}: {e} (expected RFC 3339 in UTC, e.g. 2024-05-01T12:00:00Z)"))
}

/// `a` before `b` when `a` takes precedence: it was created first (a known creation time
/// before an unknown one), else its `namespace/name` sorts first, else its kind.
pub fn precedence(a: &Route, b: &Route) -> Ordering {
    fn key(r: &Route) -> (bool, Option<SystemTime>, &str, &str, super::RouteKind) {
        (
            r.created.is_none(),
            r.created,
            &r.namespace,
            &r.name,
            r.kind,
        )
    }
    key(a).cmp(&key(b))
}
