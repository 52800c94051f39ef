//! The node agent (`ztunnel`): in-pod traffic capture, the HBONE mutual-TLS tunnel between
//! nodes, and enforcement of identity-based policy.
//!
//! Layout: [`app`] (the one place tasks are spawned), [`enroll`] (the enrollment socket),
//! [`pods`] (enrolled pods), [`netns`] (working inside a pod's network namespace),
//! [`congestion`] (TCP congestion control: the pods' loopback legs, the network's),
//! [`redirect`] (the nftables capture rules), [`state`] (mesh workloads and Services),
//! [`discovery`] (the controller's stream of state and policy), [`certs`] (keys made
//! here, SVIDs from the controller, the TLS configurations built from them), [`outbound`]
//! (the captured connection) → [`route`] (where it goes: a pure decision; outside the mesh,
//! the pod's DNS [pins](dns::pins) and the [`sni`] it asked for are recorded, and [`egress`]
//! decides by EgressPolicy, with budgets and open connections re-decided) → [`hbone`] (the
//! tunnel protocol and connection pool) → [`inbound`] (the tunnel's end, and plaintext);
//! [`relay`] (the byte copy every path ends in; [`busy_poll`]: staying awake after it, for a
//! window learnt from the traffic), [`proxy`] (what handlers share, and each
//! connection's record), [`guard`] (destinations
//! and sources never trusted), [`authz`] (policy decisions), [`conntrack`] (open connections
//! re-checked on policy change), [`telemetry`] (metrics and access records), [`dns`] (the
//! DNS capture on 15053: answers, DNS records, pins), [`udp`] (counting UDP dropped in and
//! leaving pods, recording UDP flows), [`admin`] (HTTP endpoints), [`memory`]
//! (freed memory returned after floods), [`gateway`] (gateway mode: one gateway pod served
//! instead of a node's pods; the egress gateway).
//!
//! It depends on `membrane-api`, `membrane-proto`, `membrane-identity`, `membrane-policy` and
//! `membrane-runtime`, never on the controller crate.

pub mod admin;
pub mod app;
pub mod authz;
pub mod busy_poll;
pub mod certs;
pub mod congestion;
pub mod conntrack;
pub mod dialect;
pub mod discovery;
pub mod dns;
pub mod egress;
pub mod enroll;
pub mod gateway;
pub mod guard;
pub mod hbone;
pub mod inbound;
pub mod memory;
pub mod netns;
pub mod outbound;
pub mod pods;
pub mod proxy;
pub mod redirect;
pub mod relay;
pub mod route;
pub mod sni;
pub mod state;
pub mod telemetry;
pub mod tunnel_slots;
pub mod udp;

pub(crate) use membrane_runtime::lock;
