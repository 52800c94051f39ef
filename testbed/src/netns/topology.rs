//! The cluster's parts (fabric, nodes, pods), their addressing plan and names.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use super::{Netns, sys};

/// The fabric subnet: node `i` (1-based) is `172.31.0.i/24` on it.
pub const FABRIC_SUBNET: Cidr = Cidr::new(Ipv4Addr::new(172, 31, 0, 0), 24);

/// The pod supernet: node `i` owns `10.77.i.0/24`.
pub const POD_SUPERNET: Cidr = Cidr::new(Ipv4Addr::new(10, 77, 0, 0), 16);

/// The IPv6 fabric subnet (`/64`): node `i` is `fd00:31::<i>` on it, beside its IPv4 address.
pub const FABRIC_SUBNET6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x31, 0, 0, 0, 0, 0, 0);

/// The IPv6 pod supernet: node `i` owns `fd00:77:<i>::/64` (`i` as a decimal-looking hex
/// group: node 1 owns `fd00:77:1::/64`, node 12 `fd00:77:c::/64`), and the pod whose IPv4
/// address ends in `.o` has `fd00:77:<i>::<o>` (`o` likewise: `.10` is `::a`).
pub const POD_SUPERNET6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 0);

/// The IPv6 address with `node` in the pod supernet's third group and `host` in the last.
pub(super) fn pod_v6(node: u16, host: u16) -> Ipv6Addr {
    let s = POD_SUPERNET6.segments();
    Ipv6Addr::new(s[0], s[1], node, 0, 0, 0, 0, host)
}

/// Most nodes one testbed can hold.
pub const MAX_NODES: usize = 250;

/// Name of the fabric bridge (inside the fabric namespace).
pub const BRIDGE_NAME: &str = "br-fabric";

/// Name of the node's and the pod's end of their veth pairs (inside their own namespace).
pub const IFNAME: &str = "eth0";

/// An IPv4 prefix such as `10.77.1.0/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: Ipv4Addr,
    prefix_len: u8,
}

impl Cidr {
    /// The prefix `addr/prefix_len`, host bits cleared. `prefix_len` is capped at 32.
    pub const fn new(addr: Ipv4Addr, prefix_len: u8) -> Self {
        let prefix_len = if prefix_len > 32 { 32 } else { prefix_len };
        Cidr {
            addr: Ipv4Addr::from_bits(addr.to_bits() & Self::mask(prefix_len)),
            prefix_len,
        }
    }

    const fn mask(prefix_len: u8) -> u32 {
        if prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - prefix_len as u32)
        }
    }

    /// The network address.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Whether `ip` is inside the prefix.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        ip.to_bits() & Self::mask(self.prefix_len) == self.addr.to_bits()
    }

    /// The address at `offset` from the network address, if inside the prefix.
    pub fn host(&self, offset: u32) -> Option<Ipv4Addr> {
        let ip = Ipv4Addr::from_bits(self.addr.to_bits().checked_add(offset)?);
        self.contains(ip).then_some(ip)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// The physical network: a namespace holding the bridge every node is plugged into.
#[derive(Debug, Clone)]
pub struct Fabric {
    pub(super) netns: String,
}

impl Fabric {
    /// The namespace's name (`<prefix>-fabric`).
    pub fn netns_name(&self) -> &str {
        &self.netns
    }

    /// `/run/netns/<name>`.
    pub fn netns_path(&self) -> PathBuf {
        sys::netns_path(&self.netns)
    }

    /// The bridge's name inside the fabric namespace ([`BRIDGE_NAME`]).
    pub fn bridge_name(&self) -> &str {
        BRIDGE_NAME
    }

    /// The subnet the node addresses live in ([`FABRIC_SUBNET`]).
    pub fn subnet(&self) -> Cidr {
        FABRIC_SUBNET
    }
}

impl Netns for Fabric {
    fn netns_name(&self) -> &str {
        &self.netns
    }
}

/// A simulated Kubernetes node: a namespace plugged into the fabric, routing for its pods.
#[derive(Debug, Clone)]
pub struct Node {
    pub(super) name: String,
    pub(super) netns: String,
    pub(super) index: usize,
    pub(super) fabric_ip: Ipv4Addr,
    pub(super) pod_cidr: Cidr,
    pub(super) bridge_port: String,
}

impl Node {
    /// The node's name (`node-a`, ...).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's name (`<prefix>-<node name>`).
    pub fn netns_name(&self) -> &str {
        &self.netns
    }

    /// `/run/netns/<name>`.
    pub fn netns_path(&self) -> PathBuf {
        sys::netns_path(&self.netns)
    }

    /// 1-based position in the testbed; it picks the node's addresses.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The node's address on the fabric (`172.31.0.<index>`), on its [`IFNAME`] interface.
    pub fn fabric_ip(&self) -> Ipv4Addr {
        self.fabric_ip
    }

    /// The node's pod CIDR (`10.77.<index>.0/24`).
    pub fn pod_cidr(&self) -> Cidr {
        self.pod_cidr
    }

    /// The pods' next hop (`10.77.<index>.1`): an address of the node on every pod-facing
    /// veth, and the source the node uses to talk to its pods.
    pub fn pod_gateway(&self) -> Ipv4Addr {
        gateway(self.pod_cidr)
    }

    /// The node's IPv6 address on the fabric (`fd00:31::<index>`).
    pub fn fabric_ip6(&self) -> Ipv6Addr {
        let s = FABRIC_SUBNET6.segments();
        Ipv6Addr::new(s[0], s[1], 0, 0, 0, 0, 0, self.index_u16())
    }

    /// The node's IPv6 pod prefix, `fd00:77:<index>::/64`.
    pub fn pod_cidr6(&self) -> String {
        format!("{}/64", pod_v6(self.index_u16(), 0))
    }

    /// The node's IPv6 pod gateway (`fd00:77:<index>::1`), on each of its pod veths.
    pub fn pod_gateway6(&self) -> Ipv6Addr {
        pod_v6(self.index_u16(), 1)
    }

    fn index_u16(&self) -> u16 {
        u16::try_from(self.index).unwrap_or(u16::MAX)
    }

    /// The node's fabric-facing interface inside its namespace ([`IFNAME`]).
    pub fn ifname(&self) -> &str {
        IFNAME
    }

    /// The fabric end of the node's veth, a port of the bridge in the fabric namespace
    /// (`veth-node<index>`): capture here to see everything the node sends or receives.
    pub fn bridge_port(&self) -> &str {
        &self.bridge_port
    }
}

impl Netns for Node {
    fn netns_name(&self) -> &str {
        &self.netns
    }
}

/// A simulated pod: a namespace with one interface, [`IFNAME`], towards its node.
#[derive(Debug, Clone)]
pub struct Pod {
    pub(super) name: String,
    pub(super) node: String,
    pub(super) netns: String,
    pub(super) ip: Ipv4Addr,
    pub(super) host_ifname: String,
}

impl Pod {
    /// The pod's name in the testbed.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name of the node it runs on.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The namespace's name (chosen by the caller, or `<prefix>-<pod name>`).
    pub fn netns_name(&self) -> &str {
        &self.netns
    }

    /// `/run/netns/<name>`.
    pub fn netns_path(&self) -> PathBuf {
        sys::netns_path(&self.netns)
    }

    /// The pod's address (a `/32` on its [`IFNAME`]).
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The pod's IPv6 address (a `/128` on its [`IFNAME`]): `fd00:77:<node>::<last octet>`,
    /// the node and host taken from its IPv4 address `10.77.<node>.<last octet>`.
    pub fn ip6(&self) -> Ipv6Addr {
        let [_, _, node, host] = self.ip.octets();
        pod_v6(u16::from(node), u16::from(host))
    }

    /// The pod's interface inside its namespace ([`IFNAME`]).
    pub fn ifname(&self) -> &str {
        IFNAME
    }

    /// The node end of the pod's veth, inside the node's namespace (`veth-pod<last octet>`).
    pub fn host_ifname(&self) -> &str {
        &self.host_ifname
    }
}

impl Netns for Pod {
    fn netns_name(&self) -> &str {
        &self.netns
    }
}

/// What [`Testbed::add_pod_with`](super::Testbed::add_pod_with) builds.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub(super) node: String,
    pub(super) name: String,
    pub(super) ip: Option<Ipv4Addr>,
    pub(super) netns_name: Option<String>,
}

impl PodSpec {
    /// A pod `name` on node `node`, with the next free address and a generated namespace
    /// name.
    pub fn new(node: impl Into<String>, name: impl Into<String>) -> Self {
        PodSpec {
            node: node.into(),
            name: name.into(),
            ip: None,
            netns_name: None,
        }
    }

    /// Uses this address; it must be a free host address of the node's pod CIDR, other than
    /// the gateway (`.1`).
    pub fn ip(mut self, ip: Ipv4Addr) -> Self {
        self.ip = Some(ip);
        self
    }

    /// Names the pod's namespace exactly so (e.g. `training-trainer-0`) instead of
    /// `<prefix>-<pod name>`. It must not exist yet.
    pub fn netns_name(mut self, name: impl Into<String>) -> Self {
        self.netns_name = Some(name.into());
        self
    }
}

/// `.1` of a pod CIDR.
fn gateway(cidr: Cidr) -> Ipv4Addr {
    cidr.host(1).unwrap_or(cidr.addr())
}
