//! `membrane policy explain --to-host/--to-ip [--sni]`: would this workload reach that
//! destination outside the mesh, and which EgressPolicy decides? The same evaluator as the
//! ztunnel (`membrane_policy::egress::decide_egress`), over the EgressPolicies of a manifest
//! directory, assuming the source pod resolved `--to-host` itself (a pin of its own) — a
//! name it did not resolve matches no host rule, which `--to-ip` alone shows.

use std::collections::BTreeMap;
use std::net::IpAddr;

use anyhow::{Context, bail};
use membrane_ca::source::ClusterState;
use membrane_policy::Source;
use membrane_policy::egress::{
    EgressIndex, EgressRequest, EgressVerdict, decide_egress, validate::parse_host,
};
use serde_json::json;

/// The egress question, as `membrane policy explain` was asked it.
#[derive(Debug)]
pub struct Question<'a> {
    /// The manifest directory (for messages).
    pub manifests: &'a std::path::Path,
    /// The source's SPIFFE ID.
    pub from: &'a str,
    /// The source pod, `NAMESPACE/POD`.
    pub from_pod: Option<&'a str>,
    /// The destination name, as the pod resolved it.
    pub to_host: Option<&'a str>,
    /// The destination address.
    pub to_ip: Option<IpAddr>,
    /// The TLS server name sent.
    pub sni: Option<&'a str>,
    /// TLS without a server name.
    pub no_sni: bool,
    /// Destination port.
    pub port: u16,
    /// One JSON object.
    pub json: bool,
    /// The controller's root namespace.
    pub root_namespace: &'a str,
}

/// The source pod's labels: `--from-pod` when given, else those of the pods running as the
/// `--from` identity (they must agree; none: an empty set, so only namespace-wide policies
/// select it).
fn source_labels(
    args: &Question<'_>,
    state: &ClusterState,
    namespace: &str,
    service_account: &str,
) -> anyhow::Result<BTreeMap<String, String>> {
    if let Some(pod) = args.from_pod {
        let (ns, name) = pod
            .split_once('/')
            .context("--from-pod must be NAMESPACE/POD")?;
        let pod = state
            .pods
            .get(&(ns.to_owned(), name.to_owned()))
            .with_context(|| format!("no pod {ns}/{name} in {}", args.manifests.display()))?;
        if pod.namespace != namespace || pod.service_account != service_account {
            bail!(
                "--from-pod {ns}/{name} runs as {}/{}, not as the --from identity",
                pod.namespace,
                pod.service_account
            );
        }
        return Ok(pod.labels.clone());
    }
    let mut sets: Vec<&BTreeMap<String, String>> = state
        .pods
        .values()
        .filter(|p| p.namespace == namespace && p.service_account == service_account)
        .map(|p| &p.labels)
        .collect();
    sets.dedup();
    match sets.as_slice() {
        [] => Ok(BTreeMap::new()),
        [one] => Ok((*one).clone()),
        _ => bail!(
            "pods with different labels run as {namespace}/{service_account}; say which with --from-pod NAMESPACE/POD"
        ),
    }
}

/// Answers an egress question; errors only for bad input.
pub fn explain(args: &Question<'_>, state: &ClusterState) -> anyhow::Result<()> {
    let identity: membrane_identity::WorkloadIdentity = args
        .from
        .parse()
        .with_context(|| format!("--from {} is not a workload SPIFFE ID", args.from))?;
    let host = match args.to_host {
        Some(h) => Some(parse_host(h).map_err(|e| anyhow::anyhow!("--to-host: {e}"))?),
        None => None,
    };
    let host = match host {
        Some(membrane_policy::egress::HostPattern::Exact(h)) => Some(h),
        Some(_) => bail!("--to-host takes a name, not a pattern"),
        None => None,
    };
    let sni = match args.sni {
        Some(s) => match parse_host(s) {
            Ok(membrane_policy::egress::HostPattern::Exact(h)) => Some(h),
            _ => bail!("--sni {s:?} is not a server name"),
        },
        None => None,
    };
    // A TLS client normally names the host it resolved.
    let tls = sni.is_some() || args.no_sni || args.port == 443;
    let sni = match sni {
        Some(s) => Some(s),
        None if tls && !args.no_sni => host.clone(),
        None => None,
    };
    let ip = args.to_ip.unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let namespace = identity.namespace().to_owned();
    let service_account = identity.service_account().to_owned();
    let labels = source_labels(args, state, &namespace, &service_account)?;
    let index = EgressIndex::build(state.egress_policies.values().cloned(), args.root_namespace);
    let selecting = index.selecting(&namespace, &labels);
    let mut principal = String::new();
    let source = Source::from_identity(&identity, &mut principal);
    let pinned: Vec<&str> = host.as_deref().into_iter().collect();
    let decision = decide_egress(
        &selecting,
        &EgressRequest {
            source,
            ip,
            port: args.port,
            pinned: &pinned,
            sni: sni.as_deref(),
            tls,
            sni_unreadable: false,
        },
    );
    let verdict = match decision.verdict {
        EgressVerdict::Passthrough => "PASSTHROUGH",
        EgressVerdict::Allow => "ALLOW",
        EgressVerdict::Deny => "DENY",
    };
    let why = match decision.reason.as_str() {
        "no_policy" => "no EgressPolicy selects the source: the connection passes through".to_owned(),
        "matched" => format!(
            "{} rule matched",
            if decision.verdict == EgressVerdict::Deny { "a DENY" } else { "an ALLOW" }
        ),
        "not_allowed" => "ALLOW EgressPolicies select the source and none of their rules matches: denied".to_owned(),
        "sni_mismatch" => "a host rule matched the name, but the TLS server name is another: denied".to_owned(),
        "sni_missing" => "a host rule matched the name, but a TLS connection without a server name may not use it (allowMissingSni is not set): denied".to_owned(),
        other => other.to_owned(),
    };
    let budget = decision.budget.map(|b| {
        json!({"sent_bytes": b.sent_bytes, "received_bytes": b.received_bytes,
               "per_seconds": b.per.as_secs()})
    });
    if args.json {
        println!(
            "{}",
            json!({
                "verdict": verdict, "policy": decision.policy, "rule": decision.rule,
                "reason": decision.reason.as_str(), "explanation": why,
                "matched": decision.host, "budget": budget,
                "audit": decision.audit, "dry_run": decision.dry_run,
                "selecting": selecting.iter().map(|p| p.key()).collect::<Vec<_>>(),
            })
        );
        return Ok(());
    }
    println!("{verdict}");
    match (&decision.policy, decision.rule) {
        (Some(p), Some(r)) => println!("decided by: {p}, rule {r}"),
        (Some(p), None) => println!("decided by: {p}"),
        _ => println!("decided by: no policy"),
    }
    println!("why: {why}");
    if let Some(b) = decision.budget {
        println!(
            "budget: sent {:?}, received {:?} per {}s (per identity and host)",
            b.sent_bytes,
            b.received_bytes,
            b.per.as_secs()
        );
    }
    for a in &decision.audit {
        println!("audit: {a}");
    }
    for d in &decision.dry_run {
        println!("dry-run: {d}");
    }
    Ok(())
}
