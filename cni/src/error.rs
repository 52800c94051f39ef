//! CNI errors: what the plugin prints on stdout when a command fails.
//!
//! The CNI specification (v1.0.0, "Error") has a plugin print
//! `{"cniVersion", "code", "msg", "details"}` on stdout and exit non-zero. Codes 1–99 are the
//! specification's; 100 and above are this plugin's own ([`CniError::code`] lists them).

use serde::Serialize;

/// The version the plugin speaks when the caller's cannot be used.
pub const CURRENT_VERSION: &str = "1.0.0";

/// Every way a CNI command can fail, each with its CNI error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CniError {
    /// Code 1: the configuration's `cniVersion` is not one this plugin speaks (or does not
    /// allow the command, as CHECK before 0.4.0).
    #[error("{0}")]
    IncompatibleVersion(String),
    /// Code 4: a required `CNI_*` environment variable is missing or malformed.
    #[error("{0}")]
    InvalidEnvironment(String),
    /// Code 6: stdin is not a JSON object.
    #[error("{0}")]
    Decode(String),
    /// Code 7: the configuration is JSON but not a valid configuration for this plugin.
    #[error("{0}")]
    InvalidConfig(String),
    /// Code 11: the ztunnel is busy or not ready yet (no mesh state; a pod it does not know
    /// while its view is not current; or it did not answer in time); the runtime may retry.
    #[error("{0}")]
    TryAgainLater(String),
    /// Code 100: the ztunnel's enrollment socket cannot be reached.
    #[error("{0}")]
    ZtunnelUnreachable(String),
    /// Code 101: the ztunnel answered, and refused the pod.
    #[error("{0}")]
    EnrollmentRefused(String),
    /// Code 102: the node's probe rule (`ip membrane-probes`) could not be installed or is
    /// missing.
    #[error("{0}")]
    ProbeRule(String),
    /// Code 103: CHECK found a mesh pod that is not captured.
    #[error("{0}")]
    NotCaptured(String),
}

impl CniError {
    /// The CNI error code.
    pub fn code(&self) -> u32 {
        match self {
            Self::IncompatibleVersion(_) => 1,
            Self::InvalidEnvironment(_) => 4,
            Self::Decode(_) => 6,
            Self::InvalidConfig(_) => 7,
            Self::TryAgainLater(_) => 11,
            Self::ZtunnelUnreachable(_) => 100,
            Self::EnrollmentRefused(_) => 101,
            Self::ProbeRule(_) => 102,
            Self::NotCaptured(_) => 103,
        }
    }

    /// The error as the specification's JSON, in `version` (the configuration's when it is
    /// known and supported).
    pub fn to_json(&self, version: Option<&str>, details: &str) -> serde_json::Value {
        #[derive(Serialize)]
        struct Wire<'a> {
            #[serde(rename = "cniVersion")]
            cni_version: &'a str,
            code: u32,
            msg: String,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        serde_json::to_value(Wire {
            cni_version: version.unwrap_or(CURRENT_VERSION),
            code: self.code(),
            msg: self.to_string(),
            details,
        })
        .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_carry_the_specification_codes() {
        let cases = [
            (CniError::IncompatibleVersion(String::new()), 1),
            (CniError::InvalidEnvironment(String::new()), 4),
            (CniError::Decode(String::new()), 6),
            (CniError::InvalidConfig(String::new()), 7),
            (CniError::TryAgainLater(String::new()), 11),
            (CniError::ZtunnelUnreachable(String::new()), 100),
        ];
        for (e, code) in cases {
            assert_eq!(e.code(), code);
        }
        let json = CniError::Decode("bad".into()).to_json(None, "");
        assert_eq!(
            json,
            serde_json::json!({"cniVersion": "1.0.0", "code": 6, "msg": "bad"})
        );
        let json = CniError::InvalidConfig("x".into()).to_json(Some("0.4.0"), "why");
        assert_eq!(json["cniVersion"], "0.4.0");
        assert_eq!(json["details"], "why");
    }
}
