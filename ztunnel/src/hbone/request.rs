//! A CONNECT request as the listening side reads it — who asks (the verified peer), for what
//! (`:authority`), with which claims (`forwarded`, `baggage`, `traceparent`) — and the
//! refusals a handler answers with. Parsers of a peer's input: they never panic, and a
//! refusal's reason stays in local logs.

use std::net::{IpAddr, SocketAddr};

use h2::RecvStream;
use http::{Method, Request, StatusCode};
use membrane_identity::SpiffeId;

use super::headers::{BAGGAGE, FORWARDED, TRACEPARENT, parse_forwarded_for};

/// A parsed, authenticated CONNECT request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// The peer's SPIFFE ID, from its verified certificate.
    pub peer: SpiffeId,
    /// The original destination (`:authority`). When the authority names a host
    /// ([`ConnectRequest::host`]) its address is unspecified (`0.0.0.0`) and only the port
    /// counts.
    pub authority: SocketAddr,
    /// The host of a `name:port` authority (lowercase): what an egress gateway resolves
    /// itself. Every other handler refuses such a request.
    pub host: Option<String>,
    /// The original source address, as the peer states it in `forwarded: for=` (a claim).
    pub forwarded_for: Option<IpAddr>,
    /// The TCP peer of the HBONE connection (what the destination can verify), if known.
    pub peer_addr: Option<SocketAddr>,
    /// The `baggage` header, if present and visible ASCII.
    pub baggage: Option<String>,
    /// The `traceparent` header, if present and visible ASCII.
    pub traceparent: Option<String>,
}

/// Why a handler refused a CONNECT; each variant is one response status. The reason is for
/// local logs only and is never sent to the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectRefusal {
    /// 400: the request makes no sense here (for example an authority this node does not own).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// 401: the peer's identity is missing or unusable.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// 403: policy denies this peer this destination.
    #[error("denied: {0}")]
    Denied(String),
    /// 503: the destination could not be reached.
    #[error("unreachable: {0}")]
    Unreachable(String),
}

impl ConnectRefusal {
    /// The status the peer receives from a handler answering denials with 403.
    pub fn status(&self) -> StatusCode {
        self.status_given(DenialStatus::Forbidden)
    }

    /// The status the peer receives when policy denials are answered with `denial`.
    pub fn status_given(&self, denial: DenialStatus) -> StatusCode {
        match self {
            ConnectRefusal::BadRequest(_) => StatusCode::BAD_REQUEST,
            ConnectRefusal::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ConnectRefusal::Denied(_) => denial.status(),
            ConnectRefusal::Unreachable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The local reason.
    pub fn reason(&self) -> &str {
        match self {
            ConnectRefusal::BadRequest(r)
            | ConnectRefusal::Unauthenticated(r)
            | ConnectRefusal::Denied(r)
            | ConnectRefusal::Unreachable(r) => r,
        }
    }
}

/// The status a policy denial is answered with. Both dialects are refusals to any HBONE
/// client (every status but 200 is); they differ only in what a peer's logs and metrics show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DenialStatus {
    /// 403 Forbidden: Membrane's answer (RFC 9110: authenticated, and not allowed).
    #[default]
    Forbidden,
    /// 401 Unauthorized: what Istio's ztunnel answers for an authorization-policy denial.
    Unauthorized,
}

impl DenialStatus {
    /// The HTTP status.
    pub fn status(self) -> StatusCode {
        match self {
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
        }
    }
}

impl std::str::FromStr for DenialStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "403" => Ok(Self::Forbidden),
            "401" => Ok(Self::Unauthorized),
            other => Err(format!(
                "{other:?} is not a denial status: 403 (Membrane) or 401 (Istio's ztunnel)"
            )),
        }
    }
}

pub(super) fn parse_request(
    request: &Request<RecvStream>,
    peer: Option<SpiffeId>,
    peer_addr: Option<SocketAddr>,
) -> Result<ConnectRequest, ConnectRefusal> {
    let Some(peer) = peer else {
        return Err(ConnectRefusal::Unauthenticated(
            "the peer presented no usable SPIFFE ID".into(),
        ));
    };
    if request.method() != Method::CONNECT {
        return Err(ConnectRefusal::BadRequest(format!(
            "method {} is not CONNECT",
            request.method()
        )));
    }
    let text = request.uri().authority().map(|a| a.as_str());
    let (authority, host) = match parse_authority(text) {
        Ok(addr) => (addr, None),
        Err(refusal) => match text.and_then(parse_named_authority) {
            Some((host, port)) => (
                SocketAddr::new(IpAddr::from([0, 0, 0, 0]), port),
                Some(host),
            ),
            None => return Err(refusal),
        },
    };
    let headers = request.headers();
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    Ok(ConnectRequest {
        peer,
        authority,
        host,
        forwarded_for: headers
            .get(FORWARDED)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_forwarded_for),
        peer_addr,
        baggage: text(BAGGAGE),
        traceparent: text(TRACEPARENT),
    })
}

/// Parses a CONNECT `:authority`: `ip:port` (IPv6 in brackets), port not 0. Never panics.
pub fn parse_authority(authority: Option<&str>) -> Result<SocketAddr, ConnectRefusal> {
    let Some(authority) = authority else {
        return Err(ConnectRefusal::BadRequest(
            "CONNECT without :authority".into(),
        ));
    };
    let bad = || {
        ConnectRefusal::BadRequest(format!(
            "authority {:?} is not ip:port",
            authority.chars().take(256).collect::<String>()
        ))
    };
    let addr: SocketAddr = authority.parse().map_err(|_| bad())?;
    if addr.port() == 0 {
        return Err(bad());
    }
    Ok(addr)
}

/// Longest host name of a `name:port` authority.
const MAX_HOST: usize = 253;

/// Parses a `name:port` CONNECT authority: a DNS name (letters, digits, `-` inside labels of
/// at most 63 characters, dots between; case folded, no trailing dot) and a port 1-65535.
/// `None` for anything else, an IP address included. Never panics.
pub fn parse_named_authority(authority: &str) -> Option<(String, u16)> {
    let (host, port) = authority.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    if host.is_empty() || host.len() > MAX_HOST || host.parse::<IpAddr>().is_ok() {
        return None;
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if !host.split('.').all(label_ok) {
        return None;
    }
    Some((host.to_ascii_lowercase(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_authorities_are_dns_names_with_a_port() {
        assert_eq!(
            parse_named_authority("HuggingFace.co:443"),
            Some(("huggingface.co".to_owned(), 443))
        );
        for bad in [
            "huggingface.co",
            "huggingface.co:0",
            "huggingface.co:70000",
            ":443",
            "10.0.0.1:443",
            "a..b:443",
            "-a.b:443",
            "a_b.c:443",
            "huggingface.co.:443",
            "[::1]:443",
        ] {
            assert_eq!(parse_named_authority(bad), None, "{bad}");
        }
        assert_eq!(
            parse_named_authority(&format!("{}:1", "a".repeat(64))),
            None
        );
    }

    #[test]
    fn authority_must_be_ip_and_port() {
        assert_eq!(
            parse_authority(Some("10.0.0.1:80")),
            Ok("10.0.0.1:80".parse().expect("addr"))
        );
        assert_eq!(
            parse_authority(Some("[fd00::1]:8080")),
            Ok("[fd00::1]:8080".parse().expect("addr"))
        );
        for bad in [
            None,
            Some("example.com:80"),
            Some("10.0.0.1"),
            Some("10.0.0.1:0"),
            Some("fd00::1:80"),
            Some("10.0.0.1:99999"),
            Some(""),
        ] {
            let err = parse_authority(bad).expect_err("refused");
            assert_eq!(err.status(), StatusCode::BAD_REQUEST, "{bad:?}");
        }
    }

    #[test]
    fn refusal_statuses() {
        assert_eq!(
            ConnectRefusal::Unauthenticated("x".into()).status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            ConnectRefusal::Denied("x".into()).status(),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            ConnectRefusal::Denied("x".into()).status_given(DenialStatus::Unauthorized),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!("401".parse(), Ok(DenialStatus::Unauthorized));
        assert_eq!("403".parse(), Ok(DenialStatus::Forbidden));
        assert!("200".parse::<DenialStatus>().is_err());
        let unreachable = ConnectRefusal::Unreachable("app down".into());
        assert_eq!(unreachable.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(unreachable.reason(), "app down");
    }
}
