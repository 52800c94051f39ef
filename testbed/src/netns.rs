//! A network-namespace testbed: a small Kubernetes-like cluster on one Linux host.
//!
//! Every "node" and every "pod" is a network namespace, so the mesh's per-node agent can run
//! as one process per node (started in the node's namespace) and pod traffic really crosses
//! veth pairs, routing tables and a simulated physical network. Needs root (or
//! `CAP_SYS_ADMIN` + `CAP_NET_ADMIN`) and iproute2's `ip`; everything is driven through
//! `ip` and safe `setns(2)` calls, nothing touches the host's own namespace.
//!
//! # Topology
//!
//! ```text
//!                          fabric netns  <prefix>-fabric
//!       +-------------------------------------------------------------------+
//!       |                   bridge br-fabric (no address)                   |
//!       |       port veth-node1                     port veth-node2         |
//!       +------------|-------------------------------------|----------------+
//!                    | veth pair                           | veth pair
//!       +------------|-----------------+     +-------------|----------------+
//! node  | eth0 172.31.0.1/24           |     | eth0 172.31.0.2/24           |
//! netns | node-a, ip_forward=1         |     | node-b, ip_forward=1         |
//!       | 10.77.2.0/24 via 172.31.0.2  |     | 10.77.1.0/24 via 172.31.0.1  |
//!       | 10.77.1.2/32 dev veth-pod2   |     | 10.77.2.2/32 dev veth-pod2   |
//!       | 10.77.1.3/32 dev veth-pod3   |     |                              |
//!       | 10.77.1.1/32 on each veth-pod|     | 10.77.2.1/32 on each veth-pod|
//!       |   veth-pod2      veth-pod3   |     |   veth-pod2                  |
//!       +-----|---------------|--------+     +-----|------------------------+
//!             | veth pair     |                    |
//!        +----|----+     +----|----+          +----|----+
//! pod    | eth0    |     | eth0    |          | eth0    |
//! netns  |10.77.1.2|     |10.77.1.3|          |10.77.2.2|
//!        +---------+     +---------+          +---------+
//!       in each pod: 10.77.<i>.1 dev eth0 scope link; default via 10.77.<i>.1
//! ```
//!
//! # Addressing
//!
//! * Node `i` (1-based, in creation order, at most [`MAX_NODES`]) has `172.31.0.i/24` on its
//!   `eth0` ([`FABRIC_SUBNET`]) and owns the pod CIDR `10.77.i.0/24` ([`POD_SUPERNET`]).
//!   Every node routes every other node's pod CIDR via that node's fabric address, and
//!   forwards. The fabric bridge itself has no address: it is a switch.
//! * Pods use point-to-point routing, as the CNI `ptp` plugin and Calico do: the pod has its
//!   address as a `/32` on `eth0`, a link route to the node's pod gateway `10.77.i.1` and a
//!   default route via it. The node has `10.77.i.1/32` on each pod-facing veth
//!   (`veth-pod<last octet>`) and a `/32` route to each pod through its veth. So all pod
//!   traffic, even between pods of one node, is routed by the node; traffic between nodes
//!   crosses the fabric bridge (capture there to see what goes "over the wire").
//! * Pod addresses are given ([`PodSpec::ip`]) or the lowest free from `.2` to `.254`.
//! * All testbeds use the same addresses: they live in separate namespaces and never meet.
//!
//! # Names
//!
//! * [`Testbed::new`] picks the prefix `mbt-<pid>-<n>` (decimal pid of this process, and a
//!   per-process counter), so concurrent tests and test processes never collide; its
//!   namespaces are `mbt-<pid>-<n>-fabric`, `mbt-<pid>-<n>-<node>` and `mbt-<pid>-<n>-<pod>`.
//! * [`Testbed::with_prefix`] uses a caller-chosen prefix (`local-fabric`, `local-node-a`,
//!   ...), and [`PodSpec::netns_name`] names a pod's namespace exactly (e.g.
//!   `training-trainer-0`, `<k8s namespace>-<pod>`).
//! * Names are 1 to 64 bytes of `[A-Za-z0-9._-]`. Creating a namespace that already exists
//!   fails: a testbed never adopts a namespace it did not create.
//! * Interface names are fixed and short (`br-fabric`, `veth-node<i>`, `eth0`,
//!   `veth-pod<octet>`, all under the 15-byte limit). They cannot collide across testbeds
//!   because every interface is created directly inside the testbed's own namespaces
//!   (`ip -n A link add X type veth peer name Y netns B`), never in the host's.
//!
//! # Cleanup
//!
//! Dropping a [`Testbed`], also while a test unwinds from a panic, SIGKILLs the processes
//! still running in its namespaces (other than this process) and deletes every namespace it
//! created, which destroys their veth pairs; [`Testbed::teardown`] does the same and
//! reports errors. Sockets held by this process keep a deleted namespace alive, anonymously,
//! until they are closed; its name is gone at once.
//!
//! A process killed before it could clean up leaves namespaces behind. Each
//! [`Testbed::new`] and [`Testbed::with_prefix`] first sweeps them: namespaces named
//! `mbt-<pid>-<n>-...` whose `<pid>` has no `/proc/<pid>` (or is this very process but `<n>`
//! is not one of its live testbeds: a previous owner of the pid) get their processes killed
//! and are deleted. Nothing else is ever swept, in particular not caller-chosen names.
//!
//! # Example
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::io::{Read, Write};
//! use std::net::{TcpListener, TcpStream};
//! use membrane_testbed::netns::{Netns, Testbed};
//!
//! let mut testbed = Testbed::new()?;
//! testbed.add_node("node-a")?;
//! testbed.add_node("node-b")?;
//! let client = testbed.add_pod("node-a", "client")?;
//! let server = testbed.add_pod("node-b", "server")?;
//!
//! let listener = server.run(|| TcpListener::bind((server.ip(), 8080)))??;
//! let mut stream = client.run(|| TcpStream::connect((server.ip(), 8080)))??;
//! stream.write_all(b"hello")?;
//! let (mut accepted, _) = listener.accept()?;
//! let mut buf = [0; 5];
//! accepted.read_exact(&mut buf)?;
//! testbed.teardown()?;
//! # Ok(()) }
//! ```

mod capture;
mod error;
mod naming;
mod sys;
mod testbed;
mod topology;

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::{Child, Command, Output};

pub use capture::{Capture, Captured, MAX_CAPTURE_BYTES};
pub use error::{Error, Result};
pub use naming::GENERATED_PREFIX;
pub use sys::{NETNS_RUN_DIR, command_in, exec_in, run_in_netns, spawn_in, wait_listening};
pub use testbed::{Testbed, external_ip6};
pub use topology::{
    BRIDGE_NAME, Cidr, FABRIC_SUBNET, FABRIC_SUBNET6, Fabric, IFNAME, MAX_NODES, Node,
    POD_SUPERNET, POD_SUPERNET6, Pod, PodSpec,
};

/// Something that names a network namespace: the fabric, a node, a pod, or a plain name
/// (`&str`, `String`) of a namespace under [`NETNS_RUN_DIR`].
pub trait Netns {
    /// The namespace's name.
    fn netns_name(&self) -> &str;

    /// `/run/netns/<name>`.
    fn netns_path(&self) -> PathBuf {
        sys::netns_path(self.netns_name())
    }

    /// Runs `f` on a thread inside this namespace; see [`run_in_netns`].
    fn run<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        run_in_netns(self.netns_path(), f)
    }

    /// Runs a command inside this namespace and collects its output; see [`exec_in`].
    fn exec(&self, args: &[&str]) -> Result<Output> {
        exec_in(self.netns_name(), args)
    }

    /// A [`Command`] running `program` inside this namespace; see [`command_in`].
    fn command(&self, program: impl AsRef<OsStr>) -> Command {
        command_in(self.netns_name(), program)
    }

    /// Spawns `command` inside this namespace; see [`spawn_in`].
    fn spawn(&self, command: &Command) -> Result<Child> {
        spawn_in(self.netns_name(), command)
    }
}

impl Netns for str {
    fn netns_name(&self) -> &str {
        self
    }
}

impl Netns for String {
    fn netns_name(&self) -> &str {
        self
    }
}

impl<T: Netns + ?Sized> Netns for &T {
    fn netns_name(&self) -> &str {
        (**self).netns_name()
    }
}
