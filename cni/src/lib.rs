//! `membrane-cni`: Membrane's chained CNI plugin (CNI specification v1.0.0; 0.3.0–0.4.0
//! configurations are accepted too).
//!
//! The container runtime runs it last in the node's configuration list, after the primary CNI
//! has given the pod its network, with the configuration on stdin ([`config`]) and the
//! command in `CNI_*` variables ([`env`](mod@env)). On ADD it hands the pod's UID and network
//! namespace to the node's ztunnel over the enrollment socket ([`ztunnel`]) and returns only
//! once the ztunnel has captured the pod — or remembered it as not (yet) a mesh workload — so
//! a mesh pod's containers never run uncaptured. It keeps the node's kubelet-probe exemption
//! up to date ([`probes`]). DEL forgets the pod, CHECK verifies, VERSION reports
//! ([`plugin`]). Failures are the specification's error JSON with a code ([`error`]).
//!
//! What the plugin must not do: decide who a pod is (its identity comes only from the
//! controller, through the ztunnel), talk to the Kubernetes API, or touch anything inside the
//! pod (the ztunnel installs the pod's rules). It is synchronous and short-lived: no async
//! runtime.

pub mod config;
pub mod env;
pub mod error;
pub mod plugin;
pub mod probes;
pub mod ztunnel;

pub use config::NetConf;
pub use error::CniError;
pub use plugin::{Outcome, run};
