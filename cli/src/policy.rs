//! `membrane policy check` and `membrane policy explain`.
//!
//! `check` validates AuthorizationPolicy and EgressPolicy files and prints every error and
//! warning with its field path (exit 1 on errors). `explain` answers "would this source reach
//! that workload on that port, and which policy decides?" from a directory of manifests, with
//! the ztunnel's own decision function: verdict on the first line, then the deciding policy
//! and rule, AUDIT and dry-run matches. Policies are evaluated as in the cluster of
//! `--trust-domain` (unqualified namespaces and service accounts are that trust domain's); a
//! `--from` of another trust domain is a federated source, named as such in the
//! explanation. With `--to-host`/`--to-ip` the question is about a
//! destination outside the mesh and EgressPolicy decides ([`crate::egress_explain`]). It
//! exits 0 whatever the verdict, non-zero only for bad input.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use membrane_ca::source::directory::DirectorySource;
use membrane_identity::spiffe_id::parse_trust_domain;
use membrane_policy::eval::{Decision, DecisionReason, Request, Source, decide};
use membrane_policy::{PLAINTEXT_ANNOTATION, PlaintextMode, PolicyIndex, parse_policies};
use serde_json::json;

/// Istio's root namespace: a selector-less policy there is meant mesh-wide.
const ISTIO_ROOT_NAMESPACE: &str = "istio-system";

/// The warning for a selector-less policy in `istio-system` when that is not the root
/// namespace (it would apply to `istio-system` alone, not to the mesh).
fn root_namespace_warning(
    policy: &membrane_policy::Policy,
    root_namespace: &str,
) -> Option<String> {
    (policy.namespace() == ISTIO_ROOT_NAMESPACE
        && root_namespace != ISTIO_ROOT_NAMESPACE
        && policy.selector.is_empty())
    .then(|| {
        format!(
            "policy {}/{}: a policy without selector in {ISTIO_ROOT_NAMESPACE} is mesh-wide in Istio, but the root namespace is {root_namespace}: here it applies to {ISTIO_ROOT_NAMESPACE} only (start the controller with --root-namespace {ISTIO_ROOT_NAMESPACE}, or move the policy to {root_namespace})",
            policy.namespace(),
            policy.name()
        )
    })
}

/// Validates files; returns whether all were valid. `root_namespace` is the controller's
/// `--root-namespace`.
pub fn check(files: &[PathBuf], root_namespace: &str) -> anyhow::Result<bool> {
    let mut ok = true;
    for file in files {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let egress = match membrane_policy::egress::parse_egress_policies(&text) {
            Ok(egress) => Some(egress.len()),
            Err(errors) => {
                ok = false;
                for e in &errors {
                    println!("{}: error: EgressPolicy {e}", file.display());
                }
                None
            }
        };
        let gateway = match membrane_policy::gateway::parse_gateway_config(&text) {
            Ok(config) => Some(config.gateways.len() + config.routes.len()),
            Err(errors) => {
                ok = false;
                for e in &errors {
                    println!("{}: error: {e}", file.display());
                }
                None
            }
        };
        match parse_policies(&text) {
            Ok(checked) => {
                for c in &checked {
                    for w in &c.warnings {
                        println!("{}: warning: {w}", file.display());
                    }
                    if let Some(w) = root_namespace_warning(&c.policy, root_namespace) {
                        println!("{}: warning: {w}", file.display());
                    }
                }
                if let (Some(egress), Some(gateway)) = (egress, gateway) {
                    println!(
                        "{}: ok ({} policies, {egress} egress policies, {gateway} gateways and routes)",
                        file.display(),
                        checked.len()
                    );
                }
            }
            Err(errors) => {
                ok = false;
                for e in &errors {
                    println!("{}: error: {e}", file.display());
                }
            }
        }
    }
    Ok(ok)
}

fn manifest_files(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        {
            continue;
        }
        if path.is_dir() {
            manifest_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
    Ok(())
}

/// What `explain` was asked (the command line of `membrane policy explain`).
#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// Directory of manifests (Namespaces, Pods with labels, AuthorizationPolicies,
    /// EgressPolicies).
    #[arg(long)]
    pub manifests: PathBuf,
    /// Source SPIFFE ID, or `none` for a plaintext source without identity. It may be of a
    /// federated trust domain (not `--trust-domain`).
    #[arg(long)]
    pub from: String,
    /// The source pod (NAMESPACE/POD), for egress questions when pods of the `--from`
    /// identity carry different labels.
    #[arg(long)]
    pub from_pod: Option<String>,
    /// Destination as NAMESPACE/POD (a mesh workload: AuthorizationPolicy decides).
    #[arg(long, required_unless_present_any = ["to_host", "to_ip"], conflicts_with_all = ["to_host", "to_ip", "sni", "no_sni"])]
    pub to: Option<String>,
    /// Destination outside the mesh by name, as the source pod resolved it (EgressPolicy
    /// decides).
    #[arg(long)]
    pub to_host: Option<String>,
    /// Destination outside the mesh by address (EgressPolicy `ipBlocks`).
    #[arg(long)]
    pub to_ip: Option<IpAddr>,
    /// The TLS server name the source sends (with `--to-host`/`--to-ip`; default on port
    /// 443: the `--to-host` name).
    #[arg(long)]
    pub sni: Option<String>,
    /// The connection is TLS without a server name (with `--to-host`/`--to-ip`).
    #[arg(long, conflicts_with = "sni")]
    pub no_sni: bool,
    /// Destination port.
    #[arg(long)]
    pub port: u16,
    /// Source IP (for ipBlocks and source.ip conditions).
    #[arg(long, default_value = "0.0.0.0")]
    pub source_ip: IpAddr,
    /// The original client's address an ingress gateway reports (for remoteIpBlocks; default:
    /// the source IP).
    #[arg(long)]
    pub remote_ip: Option<IpAddr>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// The controller's --root-namespace
    #[arg(long, value_name = "NS", default_value = membrane_policy::DEFAULT_ROOT_NAMESPACE)]
    pub root_namespace: String,
    /// The trust domain of the cluster the manifests describe (the controller's
    /// --trust-domain): unqualified namespaces in policies are this trust domain's.
    #[arg(long, value_name = "TD", default_value = membrane_identity::spiffe_id::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
}

/// Answers the question; errors only for bad input.
pub fn explain(args: &ExplainArgs) -> anyhow::Result<()> {
    let mut source_dir = DirectorySource::new(&args.manifests);
    source_dir.rescan().map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(e) = source_dir.errors().first() {
        bail!("{e}");
    }
    let state = source_dir.state();
    let Some(to) = &args.to else {
        let question = crate::egress_explain::Question {
            manifests: &args.manifests,
            from: &args.from,
            from_pod: args.from_pod.as_deref(),
            to_host: args.to_host.as_deref(),
            to_ip: args.to_ip,
            sni: args.sni.as_deref(),
            no_sni: args.no_sni,
            port: args.port,
            json: args.json,
            root_namespace: &args.root_namespace,
        };
        return crate::egress_explain::explain(&question, &state);
    };
    let mut files = Vec::new();
    manifest_files(&args.manifests, &mut files)?;
    files.sort();
    let mut policies = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file)?;
        let checked = parse_policies(&text).map_err(|errors| {
            let all: Vec<String> = errors
                .iter()
                .map(|e| format!("{}: {e}", file.display()))
                .collect();
            anyhow::anyhow!(all.join("\n"))
        })?;
        policies.extend(checked.into_iter().map(|c| c.policy));
    }
    let trust_domain = parse_trust_domain(&args.trust_domain).context("--trust-domain")?;
    let index = PolicyIndex::build_for(policies, &args.root_namespace, &trust_domain);

    let (namespace, pod_name) = to.split_once('/').context("--to must be NAMESPACE/POD")?;
    let pod = state
        .pods
        .get(&(namespace.to_owned(), pod_name.to_owned()))
        .with_context(|| {
            format!(
                "no pod {namespace}/{pod_name} in {}",
                args.manifests.display()
            )
        })?;
    let destination_ip = pod
        .ips
        .first()
        .copied()
        .unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let empty = BTreeMap::new();
    let ns_annotations = state
        .namespaces
        .get(namespace)
        .map_or(&empty, |n| &n.annotations);

    let identity = if args.from == "none" {
        None
    } else {
        let id: membrane_identity::WorkloadIdentity = args.from.parse().with_context(|| {
            format!(
                "--from {} is not a workload SPIFFE ID (or `none`)",
                args.from
            )
        })?;
        Some(id)
    };
    let mode = PlaintextMode::from_annotation(
        ns_annotations.get(PLAINTEXT_ANNOTATION).map(String::as_str),
    );
    if !mode.admits(identity.is_some()) {
        let reason = format!(
            "plaintext source refused: namespace {namespace} is not annotated membrane.dev/plaintext: permit"
        );
        return print(
            args.json,
            "DENY",
            None,
            None,
            "plaintext_refused",
            &reason,
            &[],
            &[],
        );
    }
    let mut principal = String::new();
    let source = identity
        .as_ref()
        .map(|id| Source::from_identity(id, &mut principal));
    let decision: Decision = decide(
        &index,
        &Request {
            source,
            source_ip: args.source_ip,
            remote_ip: args.remote_ip,
            destination_namespace: namespace,
            destination_labels: &pod.labels,
            destination_ip,
            destination_port: args.port,
        },
    );
    let verdict = if decision.is_allowed() {
        "ALLOW"
    } else {
        "DENY"
    };
    let policy = decision
        .policy
        .as_ref()
        .map(|p| format!("{}/{}", p.namespace, p.name));
    let reason = match decision.reason {
        DecisionReason::DeniedBy => "a DENY rule matched".to_owned(),
        DecisionReason::AllowedBy => "an ALLOW rule matched".to_owned(),
        DecisionReason::NoAllowPolicies => {
            "no ALLOW policy applies to the destination: allowed by default".to_owned()
        }
        DecisionReason::NoAllowMatched => {
            "ALLOW policies apply to the destination but none matches: denied".to_owned()
        }
    };
    let reason = match &identity {
        None => format!(
            "{reason} (plaintext source admitted to evaluation: namespace {namespace} permits plaintext)"
        ),
        Some(id) if id.trust_domain() != &trust_domain => format!(
            "{reason} (source from federated trust domain {}, not the local {trust_domain}: unqualified namespaces and service accounts in policies do not match it)",
            id.trust_domain()
        ),
        Some(_) => reason,
    };
    let audit: Vec<String> = decision
        .audit
        .iter()
        .map(|m| format!("{}/{} rule {}", m.policy.namespace, m.policy.name, m.rule))
        .collect();
    let dry_run: Vec<String> = decision
        .dry_run
        .iter()
        .map(|m| {
            format!(
                "{}/{} ({}, would {}match)",
                m.policy.namespace,
                m.policy.name,
                m.action,
                if m.would_match { "" } else { "not " }
            )
        })
        .collect();
    print(
        args.json,
        verdict,
        policy.as_deref(),
        decision.rule,
        decision.reason.as_str(),
        &reason,
        &audit,
        &dry_run,
    )
}

#[allow(clippy::too_many_arguments)]
fn print(
    json: bool,
    verdict: &str,
    policy: Option<&str>,
    rule: Option<usize>,
    reason_code: &str,
    reason: &str,
    audit: &[String],
    dry_run: &[String],
) -> anyhow::Result<()> {
    if json {
        println!(
            "{}",
            json!({
                "verdict": verdict, "policy": policy, "rule": rule, "reason": reason_code,
                "explanation": reason, "audit": audit, "dry_run": dry_run,
            })
        );
        return Ok(());
    }
    println!("{verdict}");
    match (policy, rule) {
        (Some(p), Some(r)) => println!("decided by: {p}, rule {r}"),
        (Some(p), None) => println!("decided by: {p}"),
        _ => println!("decided by: no policy"),
    }
    println!("why: {reason}");
    for a in audit {
        println!("audit: {a}");
    }
    for d in dry_run {
        println!("dry-run: {d}");
    }
    Ok(())
}
