//! The parts of HBONE where Membrane and Istio's ztunnel may differ, and how far Membrane
//! speaks Istio's way: the status of a policy denial and the `baggage` a tunnel carries.
//!
//! `baggage` (W3C Baggage) names the source for the destination's telemetry, in the keys
//! Istio's ztunnel reads: `k8s.cluster.name`, `k8s.namespace.name`, `k8s.<kind>.name` (the
//! workload: a Deployment's name when the pod has a `pod-template-hash`, a Job's when it has
//! `job-name`, else the pod's), `service.name` and `service.version` (Istio's canonical
//! service: `service.istio.io/canonical-name`, `app.kubernetes.io/name`, `app`, else the
//! workload name; `service.istio.io/canonical-revision`, `app.kubernetes.io/version`,
//! `version`, else `latest`). It is a claim: a destination never authorizes on it.
//!
//! What it must not do: decide anything. It formats what the proxy sends.

use crate::hbone::DenialStatus;
use crate::state::Workload;

/// How this ztunnel speaks HBONE where dialects differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireDialect {
    /// What a policy denial is answered with.
    pub denial: DenialStatus,
    /// This cluster's name in `baggage` (`k8s.cluster.name`).
    pub cluster: String,
}

impl Default for WireDialect {
    fn default() -> Self {
        Self {
            denial: DenialStatus::default(),
            cluster: DEFAULT_CLUSTER.to_owned(),
        }
    }
}

/// The cluster name when none is set: Istio's default cluster ID, so a mixed mesh with
/// default settings agrees.
pub const DEFAULT_CLUSTER: &str = "Kubernetes";

/// Checks a `--cluster-name`: 1-63 characters of `[A-Za-z0-9._-]` (it goes into `baggage`
/// unescaped).
pub fn parse_cluster_name(name: &str) -> Result<String, String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(name.to_owned())
    } else {
        Err(format!(
            "{name:?} is not a cluster name: 1-63 characters of letters, digits, '.', '_' and '-'"
        ))
    }
}

impl WireDialect {
    /// The `baggage` header a tunnel from `source` carries.
    pub fn baggage(&self, source: &Workload) -> String {
        let (kind, workload) = workload_of(source);
        let label = |keys: &[&str]| {
            keys.iter()
                .filter_map(|k| source.labels.get(*k))
                .find(|v| baggage_safe(v))
                .cloned()
        };
        let service = label(&[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ])
        .unwrap_or_else(|| workload.to_owned());
        let version = label(&[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ])
        .unwrap_or_else(|| "latest".to_owned());
        format!(
            "k8s.cluster.name={},k8s.namespace.name={},k8s.{kind}.name={workload},service.name={service},service.version={version}",
            self.cluster, source.namespace
        )
    }
}

/// The workload kind and name Istio's telemetry groups a pod under.
fn workload_of(pod: &Workload) -> (&'static str, &str) {
    if let Some(hash) = pod.labels.get("pod-template-hash") {
        // A ReplicaSet's pod is `<deployment>-<hash>-<suffix>`.
        let marker = format!("-{hash}-");
        if let Some(at) = pod.name.rfind(&marker).filter(|at| *at > 0) {
            return ("deployment", &pod.name[..at]);
        }
    }
    for key in ["batch.kubernetes.io/job-name", "job-name"] {
        if let Some(job) = pod.labels.get(key).filter(|v| baggage_safe(v)) {
            return ("job", job);
        }
    }
    ("pod", &pod.name)
}

/// Whether a label value can go into `baggage` as it is (Kubernetes label values are
/// `[A-Za-z0-9._-]`, at most 63; anything else is not used).
fn baggage_safe(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 63
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn pod(name: &str, labels: &[(&str, &str)]) -> Workload {
        Workload {
            uid: "u".into(),
            name: name.into(),
            namespace: "training".into(),
            service_account: "trainer".into(),
            node: "n".into(),
            ips: vec![],
            protocol: crate::state::Protocol::Hbone,
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>(),
            identity: membrane_identity::WorkloadIdentity::new(
                &membrane_identity::spiffe_id::parse_trust_domain("cluster.local").expect("td"),
                "training",
                "trainer",
            )
            .expect("identity"),
            gateway: None,
            foreign: false,
            network_gateway: None,
        }
    }

    #[test]
    fn a_deployment_pod_is_named_by_its_deployment_and_app() {
        let dialect = WireDialect {
            cluster: "gpu-east".into(),
            ..WireDialect::default()
        };
        let p = pod(
            "trainer-7d9f8c6b5-x2k9q",
            &[
                ("pod-template-hash", "7d9f8c6b5"),
                ("app", "trainer"),
                ("version", "v3"),
            ],
        );
        assert_eq!(
            dialect.baggage(&p),
            "k8s.cluster.name=gpu-east,k8s.namespace.name=training,k8s.deployment.name=trainer,service.name=trainer,service.version=v3"
        );
    }

    #[test]
    fn jobs_and_bare_pods_and_odd_labels() {
        let d = WireDialect::default();
        let job = pod(
            "ingest-abcde",
            &[("job-name", "ingest"), ("app", "bad value")],
        );
        assert_eq!(
            d.baggage(&job),
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=training,k8s.job.name=ingest,service.name=ingest,service.version=latest"
        );
        let bare = pod("scratch", &[]);
        assert!(
            d.baggage(&bare)
                .contains("k8s.pod.name=scratch,service.name=scratch")
        );
        // A hash that is not in the name is not trusted.
        let odd = pod("odd", &[("pod-template-hash", "zz")]);
        assert!(d.baggage(&odd).contains("k8s.pod.name=odd"));
    }

    #[test]
    fn cluster_names_are_checked() {
        assert_eq!(parse_cluster_name("cluster-a"), Ok("cluster-a".into()));
        assert!(parse_cluster_name("").is_err());
        assert!(parse_cluster_name("a,b=c").is_err());
        assert!(parse_cluster_name(&"x".repeat(64)).is_err());
    }
}
