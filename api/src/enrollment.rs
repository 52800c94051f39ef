//! The enrollment socket's wire types: how the node side (the CNI plugin, `membrane`, the
//! tests) tells the ztunnel about pods.
//!
//! A Unix stream socket, one JSON [`Request`] per line, one JSON [`Response`] per line:
//!
//! ```text
//! {"op":"add","uid":"<pod uid>","netns":"/run/netns/<name>"}   → {"ok":true,"enrolled":true}
//!   optional: "namespace":"<k8s namespace>","name":"<pod>","ips":["10.1.2.3"]
//! {"op":"remove","uid":"<pod uid>"}                             → {"ok":true,"removed":true}
//! {"op":"list"}                                                 → {"ok":true,"pods":[…]}
//! anything malformed                                            → {"ok":false,"error":"…"}
//! ```
//!
//! A refusal that a retry may cure carries `"retry":true`. The ztunnel serves the socket and
//! validates requests beyond their shape (`ztunnel/src/enroll.rs`); this module only defines
//! the shapes, so both ends parse what the other writes.

use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A request on the enrollment socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Enroll a pod.
    Add {
        /// Pod UID.
        uid: String,
        /// Network namespace path.
        netns: PathBuf,
        /// Kubernetes namespace (lets the ztunnel answer at once for a namespace with no
        /// mesh workload).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        namespace: Option<String>,
        /// Pod name (for logs and `list`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        /// The pod's addresses (for `list`).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        ips: Vec<IpAddr>,
    },
    /// Remove a pod.
    Remove {
        /// Pod UID.
        uid: String,
        /// The network namespace of the sandbox being torn down, when the runtime gave one:
        /// a pod enrolled in another namespace (a newer sandbox of the same pod) is kept.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        netns: Option<PathBuf>,
    },
    /// List known pods.
    List,
}

/// A response on the enrollment socket.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    /// Whether retrying later may succeed (the ztunnel has no mesh state yet, or its view is
    /// not current and it does not know the pod).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub retry: Option<bool>,
    /// For `add`: whether the pod is captured (`false`: not a mesh workload, remembered).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub enrolled: Option<bool>,
    /// For `remove`: whether the pod was enrolled.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub removed: Option<bool>,
    /// For `list`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pods: Option<Vec<PodStatus>>,
}

/// One pod in a `list` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodStatus {
    /// Pod UID.
    pub uid: String,
    /// Network namespace path (the ztunnel always sends it; a reader that does not need it
    /// accepts its absence).
    #[serde(default)]
    pub netns: PathBuf,
    /// Whether it is captured.
    #[serde(default)]
    pub enrolled: bool,
    /// Whether the mesh state says it is a mesh workload of this node.
    #[serde(default)]
    pub mesh: bool,
    /// Kubernetes namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Pod name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Addresses (the caller's, or the mesh state's).
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// The last enrollment failure, while it is not enrolled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

// === impl Response ===

impl Response {
    /// A refusal saying why.
    pub fn error(e: impl std::fmt::Display) -> Self {
        Self {
            ok: false,
            error: Some(e.to_string()),
            ..Self::default()
        }
    }

    /// A refusal that a retry may cure.
    pub fn retry_later(e: impl std::fmt::Display) -> Self {
        Self {
            retry: Some(true),
            ..Self::error(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<T: Serialize>(value: &T) -> String {
        serde_json::to_string(value).expect("serializes")
    }

    #[test]
    fn requests_as_the_plugin_writes_them_parse_on_the_ztunnel_side() {
        let add = Request::Add {
            uid: "u1".into(),
            netns: "/run/netns/p".into(),
            namespace: Some("shop".into()),
            name: None,
            ips: vec![
                "10.0.0.1".parse().expect("ip"),
                "fd00::1".parse().expect("ip"),
            ],
        };
        let text = line(&add);
        assert_eq!(
            text,
            r#"{"op":"add","uid":"u1","netns":"/run/netns/p","namespace":"shop","ips":["10.0.0.1","fd00::1"]}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&text).expect("parses"), add);
        let minimal = r#"{"op":"add","uid":"u1","netns":"/run/netns/p"}"#;
        assert_eq!(
            serde_json::from_str::<Request>(minimal).expect("parses"),
            Request::Add {
                uid: "u1".into(),
                netns: "/run/netns/p".into(),
                namespace: None,
                name: None,
                ips: Vec::new(),
            }
        );
        for (request, text) in [
            (
                Request::Remove {
                    uid: "u1".into(),
                    netns: None,
                },
                r#"{"op":"remove","uid":"u1"}"#,
            ),
            (Request::List, r#"{"op":"list"}"#),
        ] {
            assert_eq!(line(&request), text);
            assert_eq!(
                serde_json::from_str::<Request>(text).expect("parses"),
                request
            );
        }
        let unknown = r#"{"op":"add","uid":"u1","netns":"/run/netns/p","extra":1}"#;
        assert!(serde_json::from_str::<Request>(unknown).is_err());
    }

    #[test]
    fn answers_as_the_ztunnel_writes_them_parse_on_the_plugin_side() {
        let enrolled = Response {
            ok: true,
            enrolled: Some(false),
            ..Response::default()
        };
        assert_eq!(line(&enrolled), r#"{"ok":true,"enrolled":false}"#);
        let refused = Response::error("bad uid");
        assert_eq!(line(&refused), r#"{"ok":false,"error":"bad uid"}"#);
        let later = Response::retry_later("no mesh state yet");
        assert_eq!(
            line(&later),
            r#"{"ok":false,"error":"no mesh state yet","retry":true}"#
        );
        let listed = Response {
            ok: true,
            pods: Some(vec![PodStatus {
                uid: "u1".into(),
                netns: "/run/netns/p".into(),
                enrolled: true,
                mesh: true,
                namespace: Some("shop".into()),
                name: Some("web-0".into()),
                ips: vec!["10.0.0.1".parse().expect("ip")],
                error: None,
            }]),
            ..Response::default()
        };
        for response in [enrolled, refused, later, listed] {
            let parsed: Response = serde_json::from_str(&line(&response)).expect("parses");
            assert_eq!(parsed, response);
        }
        // An answer with fields this side does not know still parses (a newer ztunnel).
        let newer: Response =
            serde_json::from_str(r#"{"ok":true,"enrolled":true,"since":"now"}"#).expect("parses");
        assert_eq!(newer.enrolled, Some(true));
        // The plugin reads only uid, enrolled, mesh and ips of a listed pod.
        let sparse: Response =
            serde_json::from_str(r#"{"ok":true,"pods":[{"uid":"u1","mesh":true}]}"#)
                .expect("parses");
        let pods = sparse.pods.expect("pods");
        assert_eq!(
            (pods[0].uid.as_str(), pods[0].mesh, pods[0].enrolled),
            ("u1", true, false)
        );
    }
}
