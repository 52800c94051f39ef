//! The `TrustFederation` resource: which foreign trust domain this controller trusts, where
//! its SPIFFE bundle endpoint is, and what vouches for that endpoint on the first fetch.
//!
//! ```yaml
//! apiVersion: security.membrane.dev/v1
//! kind: TrustFederation
//! metadata: {name: cluster-b}
//! spec:
//!   trustDomain: cluster-b.example
//!   bundleEndpoint:
//!     url: https://192.0.2.10:15015/
//!     spiffeId: spiffe://cluster-b.example/ns/membrane-system/sa/membrane-ca
//!   bootstrapBundle: |   # PEM roots, or a SPIFFE bundle document (JSON)
//!     -----BEGIN CERTIFICATE-----
//!     ...
//!   serviceExports:      # optional: import the Services the peer exports
//!     url: https://192.0.2.10:15016
//!     addresses: [10.20.0.0/16]  # required: the only pod addresses accepted from it
//!   eastWestGateway:     # optional: the peer's pods are not routable from here
//!     address: 192.0.2.20:15008   # ip[:port], port 15008 when left out
//!     spiffeId: spiffe://cluster-b.example/ns/istio-gateways/sa/east-west
//! ```
//!
//! Without `eastWestGateway` the pod networks are flat: ztunnels tunnel straight to the peer's
//! pods. With it, every tunnel to an imported pod runs inside an outer tunnel to that gateway
//! (double HBONE), which must present `spiffeId`.
//!
//! Cluster-scoped (a namespace is refused). Only the `https_spiffe` profile exists: the
//! endpoint's certificate must be an X.509-SVID of `spiffeId`, verified against the peer's
//! bundle (the bootstrap one until the first fetch, then the last fetched one).

use serde::Deserialize;
use serde_json::Value;

use membrane_identity::{SpiffeId, TrustBundle, TrustDomain};

/// The resource's kind.
pub const KIND: &str = "TrustFederation";
/// Its API group (any version of it: `security.membrane.dev/v1`).
pub const GROUP: &str = "security.membrane.dev/";

/// A validated `TrustFederation`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustFederation {
    /// `metadata.name`.
    pub name: String,
    /// The federated trust domain.
    pub trust_domain: TrustDomain,
    /// The bundle endpoint (`https`).
    pub url: http::Uri,
    /// The SPIFFE ID the endpoint's certificate must carry (in `trust_domain`).
    pub endpoint_id: SpiffeId,
    /// The roots that vouch for the endpoint until the first fetch.
    pub bootstrap: TrustBundle,
    /// The peer controller's federation listener (`https://host:port`, gRPC
    /// `ServiceExports`; its certificate must carry [`Self::endpoint_id`]), when this cluster
    /// imports the Services the peer exports.
    pub exports_url: Option<http::Uri>,
    /// The networks imported endpoints must lie in (the peer's pod networks; at least one
    /// when `exports_url` is set).
    pub exports_addresses: Vec<membrane_policy::IpNet>,
    /// The peer's east-west gateway, when its pods are reached through it.
    pub east_west_gateway: Option<EastWestGateway>,
}

/// A peer's east-west gateway: its HBONE address and the identity it must present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EastWestGateway {
    /// `ip:port`.
    pub addr: std::net::SocketAddr,
    /// In the peer's trust domain.
    pub identity: SpiffeId,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Doc {
    #[serde(rename = "apiVersion")]
    _api_version: String,
    #[serde(rename = "kind")]
    _kind: String,
    metadata: Metadata,
    spec: Spec,
}

#[derive(Deserialize)]
struct Metadata {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Spec {
    trust_domain: String,
    bundle_endpoint: Endpoint,
    bootstrap_bundle: String,
    #[serde(default)]
    service_exports: Option<ExportsEndpoint>,
    #[serde(default)]
    east_west_gateway: Option<GatewayEndpoint>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct GatewayEndpoint {
    address: String,
    spiffe_id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportsEndpoint {
    url: String,
    #[serde(default)]
    addresses: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Endpoint {
    url: String,
    spiffe_id: String,
}

/// Parses and validates one `TrustFederation` object; an error names the field.
pub fn parse(value: Value) -> Result<TrustFederation, (String, String)> {
    let doc: Doc = serde_path_to_error::deserialize(value)
        .map_err(|e| (e.path().to_string(), e.inner().to_string()))?;
    let err = |field: &str, message: String| (field.to_owned(), message);
    if doc.metadata.namespace.is_some() {
        return Err(err(
            "metadata.namespace",
            "a TrustFederation is cluster-scoped".into(),
        ));
    }
    membrane_identity::spiffe_id::validate_service_account(&doc.metadata.name)
        .map_err(|e| err("metadata.name", e.to_string()))?;
    let trust_domain = membrane_identity::spiffe_id::parse_trust_domain(&doc.spec.trust_domain)
        .map_err(|e| err("spec.trustDomain", e.to_string()))?;
    let url =
        https_url(&doc.spec.bundle_endpoint.url).map_err(|m| err("spec.bundleEndpoint.url", m))?;
    let exports_url = match &doc.spec.service_exports {
        Some(e) => Some(https_url(&e.url).map_err(|m| err("spec.serviceExports.url", m))?),
        None => None,
    };
    let mut exports_addresses = Vec::new();
    if doc
        .spec
        .service_exports
        .as_ref()
        .is_some_and(|e| e.addresses.is_empty())
    {
        return Err(err(
            "spec.serviceExports.addresses",
            "name the peer's pod networks (CIDRs): only addresses there are imported".into(),
        ));
    }
    let listed = doc.spec.service_exports.iter().flat_map(|e| &e.addresses);
    for (i, text) in listed.enumerate() {
        let parsed = membrane_policy::IpNet::parse(text)
            .map_err(|m| err(&format!("spec.serviceExports.addresses[{i}]"), m))?;
        exports_addresses.push(parsed.net);
    }
    let endpoint_id = SpiffeId::new(&doc.spec.bundle_endpoint.spiffe_id)
        .map_err(|e| err("spec.bundleEndpoint.spiffeId", e.to_string()))?;
    if endpoint_id.trust_domain() != &trust_domain {
        return Err(err(
            "spec.bundleEndpoint.spiffeId",
            format!("must be in trust domain {trust_domain}"),
        ));
    }
    let east_west_gateway = match &doc.spec.east_west_gateway {
        Some(gw) => Some(EastWestGateway {
            addr: gateway_address(&gw.address)
                .map_err(|m| err("spec.eastWestGateway.address", m))?,
            identity: SpiffeId::new(&gw.spiffe_id)
                .map_err(|e| e.to_string())
                .and_then(|id| {
                    if id.trust_domain() == &trust_domain {
                        Ok(id)
                    } else {
                        Err(format!("must be in trust domain {trust_domain}"))
                    }
                })
                .map_err(|m| err("spec.eastWestGateway.spiffeId", m))?,
        }),
        None => None,
    };
    let bootstrap = bootstrap_bundle(&trust_domain, &doc.spec.bootstrap_bundle)
        .map_err(|m| err("spec.bootstrapBundle", m))?;
    Ok(TrustFederation {
        name: doc.metadata.name,
        trust_domain,
        url,
        endpoint_id,
        bootstrap,
        exports_url,
        exports_addresses,
        east_west_gateway,
    })
}

/// `ip:port` or `ip` (HBONE's port): a unicast address a ztunnel can dial.
fn gateway_address(text: &str) -> Result<std::net::SocketAddr, String> {
    let addr = match text.parse::<std::net::SocketAddr>() {
        Ok(addr) => addr,
        Err(_) => std::net::SocketAddr::new(
            text.parse()
                .map_err(|_| format!("{text:?} is neither ip:port nor an IP address"))?,
            membrane_api::ports::HBONE,
        ),
    };
    let ip = addr.ip();
    if addr.port() == 0 || ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
        return Err(format!("{addr} is not an address a ztunnel can dial"));
    }
    Ok(addr)
}

/// An `https://host[:port]/...` URL.
fn https_url(text: &str) -> Result<http::Uri, String> {
    let url: http::Uri = text
        .parse()
        .map_err(|e: http::uri::InvalidUri| e.to_string())?;
    if url.scheme_str() != Some("https") || url.host().is_none() {
        return Err("must be an https:// URL with a host".into());
    }
    Ok(url)
}

/// A bootstrap bundle: PEM roots, or a SPIFFE bundle document.
fn bootstrap_bundle(td: &TrustDomain, text: &str) -> Result<TrustBundle, String> {
    if text.trim_start().starts_with('{') {
        let doc = membrane_identity::federation::BundleDocument::parse(td, text.as_bytes())
            .map_err(|e| e.to_string())?;
        return doc.to_trust_bundle().map_err(|e| e.to_string());
    }
    TrustBundle::from_pem(td.clone(), text.as_bytes()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root_pem() -> String {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        params.self_signed(&key).expect("root").pem()
    }

    fn doc(spec_extra: serde_json::Value) -> Value {
        let mut spec = serde_json::json!({
            "trustDomain": "cluster-b.example",
            "bundleEndpoint": {
                "url": "https://192.0.2.10:15015/",
                "spiffeId": "spiffe://cluster-b.example/ns/membrane-system/sa/membrane-ca",
            },
            "bootstrapBundle": root_pem(),
        });
        if let (Value::Object(spec), Value::Object(extra)) = (&mut spec, spec_extra) {
            spec.extend(extra);
        }
        serde_json::json!({
            "apiVersion": "security.membrane.dev/v1",
            "kind": "TrustFederation",
            "metadata": {"name": "cluster-b"},
            "spec": spec,
        })
    }

    #[test]
    fn a_federation_with_service_exports_parses() {
        let fed = parse(doc(serde_json::json!({
            "serviceExports": {"url": "https://192.0.2.10:15016", "addresses": ["10.20.0.0/16"]}
        })))
        .expect("valid");
        assert_eq!(fed.trust_domain.to_string(), "cluster-b.example");
        assert_eq!(
            fed.exports_url.map(|u| u.to_string()).as_deref(),
            Some("https://192.0.2.10:15016/")
        );
        assert_eq!(fed.exports_addresses.len(), 1);
        assert!(fed.exports_addresses[0].contains("10.20.3.4".parse().expect("ip")));
        assert_eq!(
            fed.east_west_gateway, None,
            "flat unless a gateway is named"
        );
    }

    #[test]
    fn an_east_west_gateway_takes_the_hbone_port_by_default() {
        let gateway = |address: &str| {
            parse(doc(serde_json::json!({"eastWestGateway": {
                "address": address,
                "spiffeId": "spiffe://cluster-b.example/ns/gw/sa/east-west",
            }})))
            .expect("valid")
            .east_west_gateway
            .expect("gateway")
        };
        assert_eq!(gateway("192.0.2.20").addr.to_string(), "192.0.2.20:15008");
        assert_eq!(gateway("[fd00::20]:443").addr.to_string(), "[fd00::20]:443");
        assert_eq!(
            gateway("192.0.2.20").identity.to_string(),
            "spiffe://cluster-b.example/ns/gw/sa/east-west"
        );
    }

    #[test]
    fn every_refusal_names_its_field() {
        let cases = [
            (
                serde_json::json!({"serviceExports": {"url": "http://192.0.2.10:15016"}}),
                "spec.serviceExports.url",
            ),
            (
                serde_json::json!({"serviceExports": {"url": "https://h:1", "addresses": ["nope"]}}),
                "spec.serviceExports.addresses[0]",
            ),
            (
                serde_json::json!({"trustDomain": "Not A Domain"}),
                "spec.trustDomain",
            ),
            (
                serde_json::json!({"bundleEndpoint": {"url": "https://h/", "spiffeId": "spiffe://other.example/x"}}),
                "spec.bundleEndpoint.spiffeId",
            ),
            (
                serde_json::json!({"bootstrapBundle": "not a certificate"}),
                "spec.bootstrapBundle",
            ),
            (serde_json::json!({"unknown": 1}), "spec"),
            (
                serde_json::json!({"eastWestGateway": {"address": "gw.example:15008", "spiffeId": "spiffe://cluster-b.example/gw"}}),
                "spec.eastWestGateway.address",
            ),
            (
                serde_json::json!({"eastWestGateway": {"address": "127.0.0.1", "spiffeId": "spiffe://cluster-b.example/gw"}}),
                "spec.eastWestGateway.address",
            ),
            (
                serde_json::json!({"eastWestGateway": {"address": "192.0.2.20", "spiffeId": "spiffe://cluster-a.example/gw"}}),
                "spec.eastWestGateway.spiffeId",
            ),
        ];
        let missing = (
            serde_json::json!({"serviceExports": {"url": "https://h:1"}}),
            "spec.serviceExports.addresses",
        );
        for (extra, field) in cases.into_iter().chain([missing]) {
            let (got, message) = parse(doc(extra)).expect_err(field);
            assert!(
                got.starts_with(field),
                "{got}: {message} (expected {field})"
            );
        }
        let mut namespaced = doc(serde_json::json!({}));
        namespaced["metadata"]["namespace"] = "default".into();
        assert_eq!(
            parse(namespaced).expect_err("namespaced").0,
            "metadata.namespace"
        );
    }
}
