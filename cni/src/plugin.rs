//! The four commands.
//!
//! - **ADD**: hands the pod (`K8S_POD_UID`, `CNI_NETNS`, namespace, name, addresses) to the
//!   node's ztunnel and waits for its answer: a mesh pod is captured before the answer comes,
//!   so before its containers start; any other pod is remembered by the ztunnel (it enrolls
//!   it later if its namespace joins the mesh). Then it adds the pod's IPv4 addresses, and
//!   every address the ztunnel knows, to the node's probe rule ([`crate::probes`]), and
//!   prints `prevResult` unchanged.
//! - **DEL**: tells the ztunnel the pod is gone and removes its addresses from the probe
//!   rule. It never fails for a missing resource (unknown pod, no namespace, no ztunnel, no
//!   table): the specification requires DEL to be idempotent and tolerant.
//! - **CHECK** (0.4.0 and later): a pod the ztunnel counts as a mesh workload must be
//!   captured, and its probe exemption in place.
//! - **VERSION**: the supported versions.
//!
//! `failClosed` (default true) decides what a failure to capture a pod means on ADD and
//! CHECK: an error (the pod does not start), or only a warning on stderr (it starts
//! uncaptured). Errors in the invocation itself (codes 1, 4, 6, 7) are always errors.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use serde_json::{Value, json};

use crate::config::{self, NetConf};
use crate::env::{Command, Invocation};
use crate::error::{CURRENT_VERSION, CniError};
use crate::probes::ProbeRules;
use crate::ztunnel::{CallError, Request, Ztunnel};

/// What a run of the plugin produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// What to print on stdout (a result, the version information, or an error).
    pub stdout: Option<Value>,
    /// Warnings for stderr.
    pub warnings: Vec<String>,
    /// Whether the command succeeded (exit code 0; otherwise 1 with an error on stdout).
    pub success: bool,
}

/// Runs one invocation: `vars` are the process's environment variables, `stdin` the
/// network configuration, `probes` the node's probe rule.
pub fn run(vars: &BTreeMap<String, String>, stdin: &[u8], probes: &dyn ProbeRules) -> Outcome {
    let mut warnings = Vec::new();
    let version = config::declared_version(stdin);
    let result = Invocation::from_vars(vars).and_then(|inv| {
        if inv.command == Command::Version {
            return Ok(Some(json!({
                "cniVersion": CURRENT_VERSION,
                "supportedVersions": config::SUPPORTED_VERSIONS,
            })));
        }
        let conf = NetConf::parse(stdin)?;
        let mut plugin = Plugin {
            ztunnel: Ztunnel::new(&conf.enroll_socket, conf.timeout),
            conf: &conf,
            inv: &inv,
            probes,
            warnings: &mut warnings,
        };
        match inv.command {
            Command::Add => plugin.add().map(Some),
            Command::Del => plugin.del().map(|()| None),
            Command::Check => plugin.check().map(|()| None),
            Command::Version => Ok(None),
        }
    });
    match result {
        Ok(stdout) => Outcome {
            stdout,
            warnings,
            success: true,
        },
        Err(e) => Outcome {
            stdout: Some(e.to_json(version.as_deref(), "")),
            warnings,
            success: false,
        },
    }
}

struct Plugin<'a> {
    ztunnel: Ztunnel,
    conf: &'a NetConf,
    inv: &'a Invocation,
    probes: &'a dyn ProbeRules,
    warnings: &'a mut Vec<String>,
}

fn ipv4(ips: &[IpAddr]) -> Vec<Ipv4Addr> {
    ips.iter()
        .filter_map(|ip| match ip {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        })
        .collect()
}

// === impl Plugin ===

impl Plugin<'_> {
    /// With `failClosed`, the error; otherwise a warning, and the command goes on.
    fn fail(&mut self, error: CniError) -> Result<(), CniError> {
        if self.conf.fail_closed {
            return Err(error);
        }
        self.warnings.push(format!(
            "{error} (failClosed is false: going on without capture)"
        ));
        Ok(())
    }

    fn label(&self, uid: &str) -> String {
        format!("pod {} (uid {uid})", self.inv.pod_label())
    }

    /// Maps a failed call to the error the runtime sees.
    fn call_error(&self, e: CallError) -> CniError {
        match e {
            CallError::Unreachable { socket, source } => CniError::ZtunnelUnreachable(format!(
                "cannot reach the node's ztunnel at {} ({source}): is the Membrane ztunnel pod running on this node? \
                 Pods cannot start uncaptured while it is away; to let them (without capture), set \"failClosed\": false \
                 in the membrane-cni entry of the CNI configuration (Helm: cni.failClosed=false)",
                socket.display()
            )),
            e @ (CallError::Timeout { .. } | CallError::Protocol { .. }) => {
                CniError::TryAgainLater(format!("{e}; retry"))
            }
        }
    }

    fn add(&mut self) -> Result<Value, CniError> {
        let ips = self.conf.pod_ips()?;
        let Some(uid) = self.inv.pod.uid.clone() else {
            if self.inv.pod.namespace.is_some() {
                self.fail(CniError::InvalidEnvironment(format!(
                    "CNI_ARGS names {} but has no K8S_POD_UID: the container runtime is too old for membrane-cni (containerd 1.4+, CRI-O 1.20+ pass it)",
                    self.inv.pod_label()
                )))?;
            } else {
                self.warnings.push(format!(
                    "{} is not a Kubernetes pod (no K8S_POD_UID in CNI_ARGS): nothing to capture",
                    self.inv.pod_label()
                ));
            }
            return Ok(self.conf.result());
        };
        let netns = self.inv.netns.clone().unwrap_or_default();
        let reply = self.ztunnel.add(&Request::Add {
            uid: uid.clone(),
            netns,
            namespace: self.inv.pod.namespace.clone(),
            name: self.inv.pod.name.clone(),
            ips: ips.clone(),
        });
        let (reachable, enrolled) = match reply {
            Ok(r) if r.ok => (true, r.enrolled.unwrap_or(true)),
            Ok(r) => {
                let why = r.error.unwrap_or_else(|| "no reason given".into());
                let e = if r.retry == Some(true) {
                    CniError::TryAgainLater(format!(
                        "the ztunnel cannot enroll {} yet: {why}",
                        self.label(&uid)
                    ))
                } else {
                    CniError::EnrollmentRefused(format!(
                        "the ztunnel refused {}: {why}",
                        self.label(&uid)
                    ))
                };
                self.fail(e)?;
                (true, false)
            }
            Err(e) => {
                let e = self.call_error(e);
                self.fail(e)?;
                (false, false)
            }
        };
        if self.conf.probe_exemption {
            self.exempt_probes(&uid, &ips, reachable, enrolled)?;
        }
        Ok(self.conf.result())
    }

    /// Puts the pod's addresses (and those of every pod the ztunnel knows, which covers pods
    /// it found by itself) into the node's probe rule. Failing matters only for a captured
    /// pod: an uncaptured one receives its probes anyway.
    fn exempt_probes(
        &mut self,
        uid: &str,
        ips: &[IpAddr],
        reachable: bool,
        enrolled: bool,
    ) -> Result<(), CniError> {
        let mut all = ipv4(ips);
        if all.is_empty() {
            if enrolled {
                self.warnings.push(format!(
                    "{} has no IPv4 address in prevResult: its kubelet probes are not exempted from capture",
                    self.label(uid)
                ));
            }
            return Ok(());
        }
        if reachable {
            match self.ztunnel.list() {
                Ok(pods) => {
                    for ip in pods.iter().flat_map(|p| ipv4(&p.ips)) {
                        if !all.contains(&ip) {
                            all.push(ip);
                        }
                    }
                }
                Err(e) => self
                    .warnings
                    .push(format!("cannot list the ztunnel's pods: {e}")),
            }
        }
        match self.probes.ensure(&all) {
            Ok(()) => Ok(()),
            Err(e) if enrolled => Err(CniError::ProbeRule(format!(
                "{} is captured, but its kubelet probes would be refused: cannot install the node's probe rule: {e}",
                self.label(uid)
            ))),
            Err(e) => {
                self.warnings
                    .push(format!("cannot install the node's probe rule: {e}"));
                Ok(())
            }
        }
    }

    fn del(&mut self) -> Result<(), CniError> {
        let ips = self.conf.pod_ips()?;
        if let Some(uid) = self.inv.pod.uid.clone() {
            // The sandbox's namespace, so a late DEL of an older sandbox leaves a newer one
            // of the same pod captured.
            let netns = (self.inv.netns.as_deref()).filter(|p| !p.as_os_str().is_empty());
            match self.ztunnel.remove(&uid, netns) {
                Ok(r) if r.ok => {}
                Ok(r) => self.warnings.push(format!(
                    "the ztunnel did not remove {}: {}",
                    self.label(&uid),
                    r.error.unwrap_or_default()
                )),
                // The ztunnel forgets pods whose namespace is gone by itself.
                Err(e) => self.warnings.push(format!(
                    "{e}; {} is forgotten when the ztunnel sees its namespace gone",
                    self.label(&uid)
                )),
            }
        }
        // An IP the ztunnel now knows for another pod was reassigned (a repeated DEL after
        // the pod is long gone): its exemption belongs to that pod and stays.
        let mut release = ipv4(&ips);
        if let Ok(known) = self.ztunnel.list() {
            let ours = self.inv.pod.uid.as_deref();
            release.retain(|ip| {
                !known
                    .iter()
                    .any(|p| Some(p.uid.as_str()) != ours && p.ips.contains(&IpAddr::V4(*ip)))
            });
        }
        if self.conf.probe_exemption
            && let Err(e) = self.probes.remove(&release)
        {
            self.warnings.push(format!(
                "cannot remove the pod from the node's probe rule: {e}"
            ));
        }
        Ok(())
    }

    fn check(&mut self) -> Result<(), CniError> {
        if !config::version_at_least(&self.conf.cni_version, (0, 4, 0)) {
            return Err(CniError::IncompatibleVersion(format!(
                "CNI version {} does not allow CHECK (0.4.0 and later do)",
                self.conf.cni_version
            )));
        }
        if self.conf.prev_result.is_none() {
            return Err(CniError::InvalidConfig(
                "CHECK needs the prevResult of the ADD it checks".into(),
            ));
        }
        let ips = self.conf.pod_ips()?;
        let Some(uid) = self.inv.pod.uid.clone() else {
            return Ok(());
        };
        let pods = match self.ztunnel.list() {
            Ok(pods) => pods,
            Err(e) => {
                let e = self.call_error(e);
                return self.fail(e);
            }
        };
        let enrolled = match pods.iter().find(|p| p.uid == uid) {
            None => {
                let e = CniError::NotCaptured(format!(
                    "the ztunnel does not know {}: it was not added, or the ztunnel lost its state",
                    self.label(&uid)
                ));
                return self.fail(e);
            }
            Some(p) if p.mesh && !p.enrolled => {
                let e = CniError::NotCaptured(format!(
                    "{} is a mesh workload but is not captured: {}",
                    self.label(&uid),
                    p.error.as_deref().unwrap_or("enrollment pending")
                ));
                return self.fail(e);
            }
            Some(p) => p.enrolled,
        };
        if self.conf.probe_exemption && enrolled {
            for ip in ipv4(&ips) {
                let present = self.probes.contains(ip).map_err(|e| {
                    CniError::ProbeRule(format!("cannot read the node's probe rule: {e}"))
                })?;
                if !present {
                    let e = CniError::ProbeRule(format!(
                        "{} is captured but {ip} is missing from the node's probe rule (table ip {}): its kubelet probes are refused",
                        self.label(&uid),
                        crate::probes::TABLE
                    ));
                    return self.fail(e);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
