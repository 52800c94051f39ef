//! The invocation: `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`, `CNI_PATH`
//! and `CNI_ARGS`, read from a map (the process environment in `main`, a literal in tests).
//!
//! Which variables each command requires follows the specification (and libcni's `skel`):
//! ADD and CHECK need all but `CNI_ARGS`; DEL does not need `CNI_NETNS` (the namespace may be
//! gone); VERSION needs none. `CNI_ARGS` is `KEY=VALUE` pairs separated by `;`; the kubelet's
//! container runtime puts `K8S_POD_NAMESPACE`, `K8S_POD_NAME` and `K8S_POD_UID` there.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::error::CniError;

/// Longest value accepted for a pod's UID, name or namespace.
const MAX_ARG_LEN: usize = 256;

/// A CNI command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Set the pod up: enroll it.
    Add,
    /// Tear it down: unenroll it.
    Del,
    /// Verify ADD's effects are still in place.
    Check,
    /// Report the supported versions.
    Version,
}

/// What the runtime said about the pod, from `CNI_ARGS`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodArgs {
    /// `K8S_POD_NAMESPACE`.
    pub namespace: Option<String>,
    /// `K8S_POD_NAME`.
    pub name: Option<String>,
    /// `K8S_POD_UID`: what the ztunnel keys pods on.
    pub uid: Option<String>,
}

/// One invocation of the plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// `CNI_COMMAND`.
    pub command: Command,
    /// `CNI_CONTAINERID` (the pod sandbox).
    pub container_id: Option<String>,
    /// `CNI_NETNS`: the pod's network namespace.
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME`.
    pub ifname: Option<String>,
    /// The pod, from `CNI_ARGS`.
    pub pod: PodArgs,
}

fn env_error(message: impl Into<String>) -> CniError {
    CniError::InvalidEnvironment(message.into())
}

fn valid_container_id(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Parses `CNI_ARGS` (`K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;…`); unknown keys are
/// ignored, a pair without `=` or a value too long is an error (code 4). Never panics.
pub fn parse_cni_args(text: &str) -> Result<PodArgs, CniError> {
    let mut pod = PodArgs::default();
    for pair in text.split(';').filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| env_error(format!("CNI_ARGS: {pair:?} is not KEY=VALUE")))?;
        if key.is_empty() {
            return Err(env_error(format!("CNI_ARGS: {pair:?} has an empty key")));
        }
        let slot = match key {
            "K8S_POD_NAMESPACE" => &mut pod.namespace,
            "K8S_POD_NAME" => &mut pod.name,
            "K8S_POD_UID" => &mut pod.uid,
            _ => continue,
        };
        if value.len() > MAX_ARG_LEN || value.chars().any(char::is_control) {
            return Err(env_error(format!(
                "CNI_ARGS: {key} must be at most {MAX_ARG_LEN} printable characters"
            )));
        }
        *slot = (!value.is_empty()).then(|| value.to_owned());
    }
    Ok(pod)
}

// === impl Invocation ===

impl Invocation {
    /// Reads the invocation from `vars` (variable name → value).
    pub fn from_vars(vars: &BTreeMap<String, String>) -> Result<Self, CniError> {
        let get = |key: &str| vars.get(key).filter(|v| !v.is_empty()).cloned();
        let command = match get("CNI_COMMAND").as_deref() {
            Some("ADD") => Command::Add,
            Some("DEL") => Command::Del,
            Some("CHECK") => Command::Check,
            Some("VERSION") => Command::Version,
            Some(other) => {
                return Err(env_error(format!(
                    "unknown CNI_COMMAND {other:?} (ADD, DEL, CHECK, VERSION)"
                )));
            }
            None => {
                return Err(env_error(
                    "CNI_COMMAND is not set: membrane-cni is a CNI plugin, run by the container runtime",
                ));
            }
        };
        let required: &[&str] = match command {
            Command::Add | Command::Check => {
                &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"]
            }
            Command::Del => &["CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"],
            Command::Version => &[],
        };
        let missing: Vec<&str> = required
            .iter()
            .copied()
            .filter(|k| get(k).is_none())
            .collect();
        if !missing.is_empty() {
            return Err(env_error(format!(
                "required environment variables missing: {}",
                missing.join(", ")
            )));
        }
        let container_id = get("CNI_CONTAINERID");
        if let Some(id) = &container_id
            && !valid_container_id(id)
        {
            return Err(env_error(format!(
                "CNI_CONTAINERID {id:?} must be letters, digits, '_', '.', '-' and start with a letter or digit"
            )));
        }
        let netns = get("CNI_NETNS").map(PathBuf::from);
        if let Some(path) = &netns
            && command != Command::Version
            && !path.is_absolute()
        {
            return Err(env_error(format!(
                "CNI_NETNS {} must be an absolute path",
                path.display()
            )));
        }
        let pod = match command {
            Command::Version => PodArgs::default(),
            _ => parse_cni_args(&get("CNI_ARGS").unwrap_or_default())?,
        };
        Ok(Self {
            command,
            container_id,
            netns,
            ifname: get("CNI_IFNAME"),
            pod,
        })
    }

    /// The pod as `namespace/name` (or the container id) for messages.
    pub fn pod_label(&self) -> String {
        match (&self.pod.namespace, &self.pod.name) {
            (Some(ns), Some(name)) => format!("{ns}/{name}"),
            _ => format!(
                "container {}",
                self.container_id.as_deref().unwrap_or("(unknown)")
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    const ADD: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", "/var/run/netns/cni-1"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc123;K8S_POD_UID=7d3f",
        ),
    ];

    #[test]
    fn reads_an_add() {
        let inv = Invocation::from_vars(&vars(ADD)).expect("valid");
        assert_eq!(inv.command, Command::Add);
        assert_eq!(inv.netns, Some(PathBuf::from("/var/run/netns/cni-1")));
        assert_eq!(inv.pod.uid.as_deref(), Some("7d3f"));
        assert_eq!(inv.pod_label(), "shop/web-0");
    }

    #[test]
    fn environment_errors_are_code_4() {
        let without = |key: &str| {
            let mut v = vars(ADD);
            v.remove(key);
            v
        };
        for key in [
            "CNI_COMMAND",
            "CNI_CONTAINERID",
            "CNI_NETNS",
            "CNI_IFNAME",
            "CNI_PATH",
        ] {
            let err = Invocation::from_vars(&without(key)).expect_err(key);
            assert_eq!(err.code(), 4, "{key}");
        }
        // DEL tolerates a missing namespace; VERSION needs nothing.
        let mut del = without("CNI_NETNS");
        del.insert("CNI_COMMAND".into(), "DEL".into());
        assert!(Invocation::from_vars(&del).is_ok());
        assert!(Invocation::from_vars(&vars(&[("CNI_COMMAND", "VERSION")])).is_ok());
        for (key, value) in [
            ("CNI_COMMAND", "EXPLODE"),
            ("CNI_CONTAINERID", "-bad"),
            ("CNI_NETNS", "relative/path"),
            ("CNI_ARGS", "K8S_POD_UID"),
            ("CNI_ARGS", "=x"),
            ("CNI_ARGS", "K8S_POD_UID=a\nb"),
        ] {
            let mut v = vars(ADD);
            v.insert(key.into(), value.into());
            assert_eq!(
                Invocation::from_vars(&v).expect_err(value).code(),
                4,
                "{key}={value}"
            );
        }
    }

    #[test]
    fn cni_args_ignore_unknown_keys_and_empty_pairs() {
        let pod = parse_cni_args(";;K8S_POD_UID=u;;OTHER=a=b;").expect("valid");
        assert_eq!(pod.uid.as_deref(), Some("u"));
        assert_eq!(pod.namespace, None);
        assert_eq!(parse_cni_args("").expect("empty"), PodArgs::default());
    }
}
