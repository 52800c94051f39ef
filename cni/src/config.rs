//! The network configuration the runtime writes on stdin, and the pod addresses in its
//! `prevResult`.
//!
//! ```json
//! {
//!   "cniVersion": "1.0.0",
//!   "name": "k8s-pod-network",
//!   "type": "membrane-cni",
//!   "enrollSocket": "/var/run/membrane/ztunnel.sock",
//!   "failClosed": true,
//!   "timeoutSeconds": 15,
//!   "probeExemption": true,
//!   "prevResult": { "cniVersion": "1.0.0", "ips": [{"address": "10.1.2.3/24"}], … }
//! }
//! ```
//!
//! Everything here is pure and total: any byte string gives a [`NetConf`] or a typed
//! [`CniError`] (code 1, 6 or 7), never a panic (fuzzed: `fuzz/fuzz_targets/cni_config.rs`).
//! Keys this plugin does not know (`runtimeConfig`, `args`, another plugin's settings) are
//! ignored, as the specification asks.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::error::CniError;

/// The CNI versions this plugin accepts.
pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
/// Where the ztunnel listens unless `enrollSocket` says otherwise (the chart's path).
pub const DEFAULT_ENROLL_SOCKET: &str = "/var/run/membrane/ztunnel.sock";
/// How long one call to the ztunnel may take unless `timeoutSeconds` says otherwise. An
/// enrollment waits up to 10 s for the ztunnel's first mesh state, then binds and installs.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest `timeoutSeconds` accepted (a pod start should not hang for longer).
pub const MAX_TIMEOUT_SECONDS: u64 = 300;
/// Largest configuration read from stdin.
pub const MAX_CONFIG_LEN: usize = 1024 * 1024;
/// Longest Unix socket path (`sun_path` holds 108 bytes with the terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

/// This plugin's configuration, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    /// `cniVersion`: one of [`SUPPORTED_VERSIONS`].
    pub cni_version: String,
    /// `name` of the network.
    pub name: String,
    /// `type` (the plugin's binary name as the runtime found it).
    pub plugin_type: String,
    /// `prevResult`: what the plugins before this one produced; passed through on ADD.
    pub prev_result: Option<Map<String, Value>>,
    /// `enrollSocket`: the ztunnel's enrollment socket.
    pub enroll_socket: PathBuf,
    /// `failClosed`: a pod that cannot be handed to the ztunnel does not start (default);
    /// `false`: it starts uncaptured and the failure is only reported on stderr.
    pub fail_closed: bool,
    /// `timeoutSeconds`: bound of each call to the ztunnel.
    pub timeout: Duration,
    /// `probeExemption`: keep the node's kubelet-probe rule (default true).
    pub probe_exemption: bool,
}

/// The version a configuration declares, if it is one this plugin speaks (for the
/// `cniVersion` of an error about the rest of the configuration).
pub fn declared_version(bytes: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(bytes).ok()?;
    let version = value.get("cniVersion")?.as_str()?;
    SUPPORTED_VERSIONS
        .contains(&version)
        .then(|| version.to_owned())
}

/// Whether `version` is at least `major.minor.patch` (for CHECK, which 0.4.0 introduced).
pub fn version_at_least(version: &str, wanted: (u32, u32, u32)) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let v = (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    );
    v >= wanted
}

fn invalid(message: impl Into<String>) -> CniError {
    CniError::InvalidConfig(message.into())
}

fn optional_bool(obj: &Map<String, Value>, key: &str, default: bool) -> Result<bool, CniError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(invalid(format!("{key} must be true or false, not {other}"))),
    }
}

fn required_string(obj: &Map<String, Value>, key: &str) -> Result<String, CniError> {
    match obj.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Value::String(_)) => Err(invalid(format!("{key} must not be empty"))),
        None | Some(Value::Null) => Err(invalid(format!("{key} is missing"))),
        Some(other) => Err(invalid(format!("{key} must be a string, not {other}"))),
    }
}

// === impl NetConf ===

impl NetConf {
    /// Parses and validates the configuration read from stdin.
    pub fn parse(bytes: &[u8]) -> Result<Self, CniError> {
        if bytes.len() > MAX_CONFIG_LEN {
            return Err(CniError::Decode(format!(
                "the network configuration is larger than {MAX_CONFIG_LEN} bytes"
            )));
        }
        let value: Value = serde_json::from_slice(bytes).map_err(|e| {
            CniError::Decode(format!("cannot decode the network configuration: {e}"))
        })?;
        let Value::Object(obj) = value else {
            return Err(CniError::Decode(
                "the network configuration must be a JSON object".into(),
            ));
        };
        // A configuration without a version is 0.1.0 (the specification's rule), which this
        // plugin does not speak.
        let cni_version = match obj.get("cniVersion") {
            None | Some(Value::Null) => "0.1.0".to_owned(),
            Some(Value::String(v)) => v.clone(),
            Some(other) => {
                return Err(invalid(format!("cniVersion must be a string, not {other}")));
            }
        };
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(CniError::IncompatibleVersion(format!(
                "CNI version {cni_version:?} is not supported; membrane-cni speaks {}",
                SUPPORTED_VERSIONS.join(", ")
            )));
        }
        let name = required_string(&obj, "name")?;
        let plugin_type = required_string(&obj, "type")?;
        let enroll_socket = match obj.get("enrollSocket") {
            None | Some(Value::Null) => PathBuf::from(DEFAULT_ENROLL_SOCKET),
            Some(Value::String(s)) if s.starts_with('/') && s.len() <= MAX_SOCKET_PATH => {
                PathBuf::from(s)
            }
            Some(Value::String(s)) => {
                return Err(invalid(format!(
                    "enrollSocket must be an absolute path of at most {MAX_SOCKET_PATH} bytes, not {s:?}"
                )));
            }
            Some(other) => {
                return Err(invalid(format!(
                    "enrollSocket must be a string, not {other}"
                )));
            }
        };
        let fail_closed = optional_bool(&obj, "failClosed", true)?;
        let probe_exemption = optional_bool(&obj, "probeExemption", true)?;
        let timeout = match obj.get("timeoutSeconds") {
            None | Some(Value::Null) => DEFAULT_TIMEOUT,
            Some(v) => match v.as_u64() {
                Some(s) if (1..=MAX_TIMEOUT_SECONDS).contains(&s) => Duration::from_secs(s),
                _ => {
                    return Err(invalid(format!(
                        "timeoutSeconds must be a whole number from 1 to {MAX_TIMEOUT_SECONDS}, not {v}"
                    )));
                }
            },
        };
        let prev_result = match obj.get("prevResult") {
            None | Some(Value::Null) => None,
            Some(Value::Object(prev)) => Some(prev.clone()),
            Some(other) => {
                return Err(invalid(format!(
                    "prevResult must be an object, not {other}"
                )));
            }
        };
        let conf = Self {
            cni_version,
            name,
            plugin_type,
            prev_result,
            enroll_socket,
            fail_closed,
            timeout,
            probe_exemption,
        };
        // Validate the addresses now, so every command reports a bad prevResult the same way.
        conf.pod_ips()?;
        Ok(conf)
    }

    /// The pod's addresses: every `prevResult.ips[].address` (`ip/prefix`), in order, without
    /// duplicates.
    pub fn pod_ips(&self) -> Result<Vec<IpAddr>, CniError> {
        let Some(prev) = &self.prev_result else {
            return Ok(Vec::new());
        };
        let ips = match prev.get("ips") {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::Array(ips)) => ips,
            Some(other) => {
                return Err(invalid(format!(
                    "prevResult.ips must be a list, not {other}"
                )));
            }
        };
        let mut out = Vec::new();
        for (i, entry) in ips.iter().enumerate() {
            let address = entry
                .get("address")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    invalid(format!(
                        "prevResult.ips[{i}].address is missing or not a string"
                    ))
                })?;
            let ip = parse_cidr(address).ok_or_else(|| {
                invalid(format!(
                    "prevResult.ips[{i}].address {address:?} is not an address with a prefix length (10.1.2.3/24)"
                ))
            })?;
            if !out.contains(&ip) {
                out.push(ip);
            }
        }
        Ok(out)
    }

    /// What ADD prints: the previous result unchanged, or, when this plugin runs alone, an
    /// empty result of the configuration's version.
    pub fn result(&self) -> Value {
        let mut result = self.prev_result.clone().unwrap_or_default();
        result
            .entry("cniVersion")
            .or_insert_with(|| Value::String(self.cni_version.clone()));
        Value::Object(result)
    }
}

/// `10.1.2.3/24` → `10.1.2.3` (the prefix length is checked, then dropped).
fn parse_cidr(text: &str) -> Option<IpAddr> {
    let (ip, prefix) = text.split_once('/')?;
    let ip: IpAddr = ip.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (prefix <= max).then_some(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NetConf, CniError> {
        NetConf::parse(text.as_bytes())
    }

    #[test]
    fn defaults_and_settings() {
        let conf =
            parse(r#"{"cniVersion":"1.0.0","name":"net","type":"membrane-cni"}"#).expect("valid");
        assert_eq!(conf.enroll_socket, PathBuf::from(DEFAULT_ENROLL_SOCKET));
        assert!(conf.fail_closed);
        assert!(conf.probe_exemption);
        assert_eq!(conf.timeout, DEFAULT_TIMEOUT);
        assert_eq!(conf.result(), serde_json::json!({"cniVersion": "1.0.0"}));
        let conf = parse(
            r#"{"cniVersion":"0.4.0","name":"net","type":"membrane-cni","enrollSocket":"/tmp/z.sock",
               "failClosed":false,"timeoutSeconds":3,"probeExemption":false,"runtimeConfig":{},
               "prevResult":{"cniVersion":"0.4.0","ips":[{"version":"4","address":"10.1.2.3/24"},
               {"address":"fd00::3/64"},{"address":"10.1.2.3/24"}]}}"#,
        )
        .expect("valid");
        assert_eq!(conf.enroll_socket, PathBuf::from("/tmp/z.sock"));
        assert!(!conf.fail_closed && !conf.probe_exemption);
        assert_eq!(conf.timeout, Duration::from_secs(3));
        let ips: Vec<String> = conf
            .pod_ips()
            .expect("ips")
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(ips, ["10.1.2.3", "fd00::3"]);
        assert_eq!(conf.result()["ips"][0]["version"], "4", "passed through");
    }

    #[test]
    fn errors_have_the_right_codes() {
        for (text, code) in [
            ("", 6),
            ("not json", 6),
            ("[1,2]", 6),
            (r#"{"name":"n","type":"t"}"#, 1),
            (r#"{"cniVersion":"0.2.0","name":"n","type":"t"}"#, 1),
            (r#"{"cniVersion":"2.0.0","name":"n","type":"t"}"#, 1),
            (r#"{"cniVersion":1,"name":"n","type":"t"}"#, 7),
            (r#"{"cniVersion":"1.0.0","type":"t"}"#, 7),
            (r#"{"cniVersion":"1.0.0","name":"","type":"t"}"#, 7),
            (r#"{"cniVersion":"1.0.0","name":"n"}"#, 7),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"t","failClosed":"yes"}"#,
                7,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"t","enrollSocket":"rel.sock"}"#,
                7,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"t","timeoutSeconds":0}"#,
                7,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"t","timeoutSeconds":1.5}"#,
                7,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"t","prevResult":[]}"#,
                7,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"t","prevResult":{"ips":[{"address":"10.0.0.1"}]}}"#,
                7,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"t","prevResult":{"ips":[{"address":"10.0.0.1/33"}]}}"#,
                7,
            ),
        ] {
            let err = parse(text).expect_err(text);
            assert_eq!(err.code(), code, "{text}: {err}");
        }
        let big = vec![b' '; MAX_CONFIG_LEN + 1];
        assert_eq!(NetConf::parse(&big).expect_err("too big").code(), 6);
    }

    #[test]
    fn versions() {
        assert_eq!(
            declared_version(br#"{"cniVersion":"0.3.1"}"#).as_deref(),
            Some("0.3.1")
        );
        assert_eq!(declared_version(br#"{"cniVersion":"9.9.9"}"#), None);
        assert_eq!(declared_version(b"garbage"), None);
        assert!(version_at_least("0.4.0", (0, 4, 0)));
        assert!(version_at_least("1.0.0", (0, 4, 0)));
        assert!(!version_at_least("0.3.1", (0, 4, 0)));
    }
}
