//! The testbed: building the cluster, and tearing it down.

use std::net::Ipv4Addr;
use std::process::{Child, Command, Output};

use super::capture::Capture;
use super::error::{Error, Result};
use super::topology::{
    BRIDGE_NAME, Cidr, FABRIC_SUBNET, FABRIC_SUBNET6, Fabric, IFNAME, MAX_NODES, Node,
    POD_SUPERNET, Pod, PodSpec,
};
use super::{Netns, naming, sys};

/// A simulated cluster of network namespaces. See the [module documentation](super) for the
/// topology, addressing and naming.
///
/// Dropping it (also while unwinding from a panic) kills the processes left inside its
/// namespaces and deletes every namespace it created; [`Testbed::teardown`] does the same
/// and reports errors.
#[derive(Debug)]
pub struct Testbed {
    id: String,
    /// The registry counter of a generated id (`None` with a caller-chosen prefix).
    generated: Option<u64>,
    fabric: Fabric,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
    /// Namespaces this testbed created, in creation order: the only ones it deletes.
    created: Vec<String>,
    /// Set by `teardown` and `detach`: nothing left to do on drop.
    finished: bool,
}

impl Testbed {
    /// Creates a testbed with a generated, collision-free prefix `mbt-<pid>-<n>`, holding only
    /// the fabric. Sweeps stale namespaces of dead processes first (see the module docs).
    pub fn new() -> Result<Self> {
        naming::sweep_stale();
        let (id, n) = naming::allocate();
        Self::build(id, Some(n))
    }

    /// Creates a testbed whose namespaces are named `<prefix>-fabric`, `<prefix>-<node>` and
    /// (unless chosen per pod) `<prefix>-<pod>`, e.g. for `membrane local`. Fails if one of
    /// them already exists; such namespaces are never adopted. The stale sweep runs as in
    /// [`Testbed::new`], but never touches these names.
    pub fn with_prefix(prefix: &str) -> Result<Self> {
        naming::validate(prefix)?;
        if prefix.starts_with(naming::GENERATED_PREFIX) {
            return Err(Error::invalid_name(
                prefix,
                "the `mbt-` prefix is reserved for generated testbeds",
            ));
        }
        naming::sweep_stale();
        Self::build(prefix.to_owned(), None)
    }

    fn build(id: String, generated: Option<u64>) -> Result<Self> {
        let fabric_ns = format!("{id}-fabric");
        let mut testbed = Testbed {
            id,
            generated,
            fabric: Fabric {
                netns: fabric_ns.clone(),
            },
            nodes: Vec::new(),
            pods: Vec::new(),
            created: Vec::new(),
            finished: false,
        };
        // From here on, an error drops `testbed`, which deletes whatever was created.
        naming::validate(&fabric_ns)?;
        testbed.create_netns(&fabric_ns)?;
        sys::ip_in(
            &fabric_ns,
            &[
                "link",
                "add",
                BRIDGE_NAME,
                "type",
                "bridge",
                "stp_state",
                "0",
            ],
        )?;
        sys::ip_in(&fabric_ns, &["link", "set", BRIDGE_NAME, "up"])?;
        Ok(testbed)
    }

    /// Creates a namespace (failing if it exists), records it, and brings `lo` up.
    fn create_netns(&mut self, name: &str) -> Result<()> {
        if self.created.iter().any(|n| n == name) {
            return Err(Error::AlreadyExists {
                what: "network namespace",
                name: name.to_owned(),
            });
        }
        sys::netns_add(name)?;
        self.created.push(name.to_owned());
        // IPv6 without duplicate address detection: addresses are usable at once (the
        // testbed assigns them; nothing else can claim them).
        let path = sys::netns_path(name);
        sys::write_sysctl(&path, "net/ipv6/conf/all/disable_ipv6", "0")?;
        sys::write_sysctl(&path, "net/ipv6/conf/default/accept_dad", "0")?;
        sys::write_sysctl(&path, "net/ipv6/conf/all/accept_dad", "0")?;
        sys::ip_in(name, &["link", "set", "lo", "up"])
    }

    /// The prefix of this testbed's namespace names (`mbt-<pid>-<n>` or the chosen prefix).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The fabric.
    pub fn fabric(&self) -> &Fabric {
        &self.fabric
    }

    /// The nodes, in creation order.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The pods, in creation order.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The pod called `name`.
    pub fn pod(&self, name: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.name == name)
    }

    /// Names of the namespaces this testbed created (and will delete), in creation order.
    pub fn netns_names(&self) -> &[String] {
        &self.created
    }

    /// Adds a node: its namespace (`<prefix>-<name>`), a veth to the fabric bridge, its
    /// fabric address, forwarding, and routes between its pod CIDR and every other node's.
    ///
    /// If this fails halfway, what it created is still deleted with the testbed, but the
    /// testbed may be inconsistent: drop it. (The same holds for adding pods.)
    pub fn add_node(&mut self, name: &str) -> Result<Node> {
        naming::validate(name)?;
        if self.node(name).is_some() {
            return Err(Error::AlreadyExists {
                what: "node",
                name: name.to_owned(),
            });
        }
        let index = self.nodes.len() + 1;
        if index > MAX_NODES {
            return Err(Error::Exhausted(format!("at most {MAX_NODES} nodes")));
        }
        let netns = format!("{}-{name}", self.id);
        naming::validate(&netns)?;
        let octet = u32::try_from(index).map_err(|_| Error::Exhausted("node index".into()))?;
        let node = Node {
            name: name.to_owned(),
            netns: netns.clone(),
            index,
            fabric_ip: FABRIC_SUBNET
                .host(octet)
                .ok_or_else(|| Error::Exhausted("fabric addresses".into()))?,
            pod_cidr: Cidr::new(
                POD_SUPERNET
                    .host(octet << 8)
                    .ok_or_else(|| Error::Exhausted("pod CIDRs".into()))?,
                24,
            ),
            bridge_port: format!("veth-node{index}"),
        };

        self.create_netns(&netns)?;
        let fabric = self.fabric.netns.as_str();
        let port = node.bridge_port.as_str();
        sys::ip_in(
            fabric,
            &[
                "link", "add", port, "type", "veth", "peer", "name", IFNAME, "netns", &netns,
            ],
        )?;
        sys::ip_in(fabric, &["link", "set", port, "master", BRIDGE_NAME, "up"])?;
        let address = format!("{}/{}", node.fabric_ip, FABRIC_SUBNET.prefix_len());
        sys::ip_in(&netns, &["addr", "add", &address, "dev", IFNAME])?;
        let address6 = format!("{}/64", node.fabric_ip6());
        sys::ip_in(
            &netns,
            &["-6", "addr", "add", &address6, "dev", IFNAME, "nodad"],
        )?;
        sys::ip_in(&netns, &["link", "set", IFNAME, "up"])?;
        sys::write_sysctl(&node.netns_path(), "net/ipv4/ip_forward", "1")?;
        sys::write_sysctl(&node.netns_path(), "net/ipv6/conf/all/forwarding", "1")?;
        for other in &self.nodes {
            route_pods_via(&node, other)?;
            route_pods_via(other, &node)?;
        }
        self.nodes.push(node.clone());
        Ok(node)
    }

    /// Removes the routes between the pod networks of nodes `a` and `b`, both ways and both
    /// families: their pods can no longer reach each other (pod networks that are not flat,
    /// as between two clusters joined only through gateways). Node addresses stay reachable.
    pub fn unroute_pods(&self, a: &str, b: &str) -> Result<()> {
        let find = |name: &str| {
            self.node(name)
                .ok_or_else(|| Error::UnknownNode(name.to_owned()))
        };
        let (a, b) = (find(a)?, find(b)?);
        for (from, to) in [(a, b), (b, a)] {
            sys::ip_in(&from.netns, &["-6", "route", "del", &to.pod_cidr6()])?;
            sys::ip_in(&from.netns, &["route", "del", &to.pod_cidr.to_string()])?;
        }
        Ok(())
    }

    /// Adds pod `name` on node `node` with the next free address and namespace
    /// `<prefix>-<name>`. See [`Testbed::add_pod_with`].
    pub fn add_pod(&mut self, node: &str, name: &str) -> Result<Pod> {
        self.add_pod_with(PodSpec::new(node, name))
    }

    /// Adds a pod: its namespace, a veth to its node, its `/32` address with a default route
    /// via the node's [pod gateway](Node::pod_gateway), and the node's `/32` route back.
    pub fn add_pod_with(&mut self, spec: PodSpec) -> Result<Pod> {
        let PodSpec {
            node,
            name,
            ip,
            netns_name,
        } = spec;
        let node = self
            .node(&node)
            .cloned()
            .ok_or_else(|| Error::UnknownNode(node.clone()))?;
        naming::validate(&name)?;
        if self.pod(&name).is_some() {
            return Err(Error::AlreadyExists {
                what: "pod",
                name: name.clone(),
            });
        }
        let netns = netns_name.unwrap_or_else(|| format!("{}-{name}", self.id));
        naming::validate(&netns)?;
        let ip = match ip {
            Some(ip) => self.check_pod_ip(&node, ip)?,
            None => self.next_pod_ip(&node)?,
        };
        let host_ifname = format!("veth-pod{}", ip.octets()[3]);
        let pod = Pod {
            name,
            node: node.name.clone(),
            netns: netns.clone(),
            ip,
            host_ifname: host_ifname.clone(),
        };

        self.create_netns(&netns)?;
        let node_ns = node.netns.as_str();
        let host = host_ifname.as_str();
        let gw = node.pod_gateway().to_string();
        let pod_ip = ip.to_string();
        sys::ip_in(
            node_ns,
            &[
                "link", "add", host, "type", "veth", "peer", "name", IFNAME, "netns", &netns,
            ],
        )?;
        sys::ip_in(node_ns, &["addr", "add", &format!("{gw}/32"), "dev", host])?;
        sys::ip_in(node_ns, &["link", "set", host, "up"])?;
        sys::ip_in(
            &netns,
            &["addr", "add", &format!("{pod_ip}/32"), "dev", IFNAME],
        )?;
        sys::ip_in(&netns, &["link", "set", IFNAME, "up"])?;
        sys::ip_in(
            &netns,
            &["route", "add", &gw, "dev", IFNAME, "scope", "link"],
        )?;
        sys::ip_in(
            &netns,
            &["route", "add", "default", "via", &gw, "dev", IFNAME],
        )?;
        sys::ip_in(
            node_ns,
            &[
                "route",
                "add",
                &format!("{pod_ip}/32"),
                "dev",
                host,
                "scope",
                "link",
                "src",
                &gw,
            ],
        )?;
        // The same plan for IPv6: `/128`s and the node's pod gateway on each veth.
        let (gw6, pod_ip6) = (node.pod_gateway6().to_string(), pod.ip6().to_string());
        sys::ip_in(
            node_ns,
            &[
                "-6",
                "addr",
                "add",
                &format!("{gw6}/128"),
                "dev",
                host,
                "nodad",
            ],
        )?;
        sys::ip_in(
            &netns,
            &[
                "-6",
                "addr",
                "add",
                &format!("{pod_ip6}/128"),
                "dev",
                IFNAME,
                "nodad",
            ],
        )?;
        sys::ip_in(&netns, &["-6", "route", "add", &gw6, "dev", IFNAME])?;
        sys::ip_in(
            &netns,
            &["-6", "route", "add", "default", "via", &gw6, "dev", IFNAME],
        )?;
        sys::ip_in(
            node_ns,
            &["-6", "route", "add", &format!("{pod_ip6}/128"), "dev", host],
        )?;
        self.pods.push(pod.clone());
        Ok(pod)
    }

    fn check_pod_ip(&self, node: &Node, ip: Ipv4Addr) -> Result<Ipv4Addr> {
        let cidr = node.pod_cidr;
        let refuse = |reason: String| Err(Error::InvalidAddress { ip, reason });
        if !cidr.contains(ip) {
            return refuse(format!("outside node {}'s pod CIDR {cidr}", node.name));
        }
        if ip == cidr.addr() || Some(ip) == cidr.host(255) {
            return refuse("network or broadcast address".to_owned());
        }
        if ip == node.pod_gateway() {
            return refuse("the node's pod gateway".to_owned());
        }
        if let Some(pod) = self.pods.iter().find(|p| p.ip == ip) {
            return refuse(format!("already used by pod {}", pod.name));
        }
        Ok(ip)
    }

    fn next_pod_ip(&self, node: &Node) -> Result<Ipv4Addr> {
        (2..255)
            .filter_map(|offset| node.pod_cidr.host(offset))
            .find(|ip| self.pods.iter().all(|p| p.ip != *ip))
            .ok_or_else(|| Error::Exhausted(format!("pod addresses of node {}", node.name)))
    }

    /// Creates `<id>-<suffix>`: a host outside the cluster (the simulated internet, for
    /// one), attached to the fabric bridge on its `eth0` with `fabric_ip` in the fabric
    /// subnet and, in the IPv6 fabric subnet, the address whose last group is `fabric_ip`'s
    /// last octet. It is deleted with the testbed, like every namespace it created. Routes to and
    /// from it are the caller's.
    pub fn add_external(&mut self, suffix: &str, fabric_ip: Ipv4Addr) -> Result<String> {
        naming::validate(suffix)?;
        let netns = format!("{}-{suffix}", self.id);
        naming::validate(&netns)?;
        if !FABRIC_SUBNET.contains(fabric_ip) || self.nodes.iter().any(|n| n.fabric_ip == fabric_ip)
        {
            return Err(Error::InvalidAddress {
                ip: fabric_ip,
                reason: format!("not a free address of the fabric {FABRIC_SUBNET}"),
            });
        }
        self.create_netns(&netns)?;
        let fabric = self.fabric.netns.as_str();
        let port = format!("veth-x{}", fabric_ip.octets()[3]);
        sys::ip_in(
            fabric,
            &[
                "link", "add", &port, "type", "veth", "peer", "name", IFNAME, "netns", &netns,
            ],
        )?;
        sys::ip_in(fabric, &["link", "set", &port, "master", BRIDGE_NAME, "up"])?;
        let address = format!("{fabric_ip}/{}", FABRIC_SUBNET.prefix_len());
        sys::ip_in(&netns, &["addr", "add", &address, "dev", IFNAME])?;
        let address6 = format!("{}/64", external_ip6(fabric_ip));
        sys::ip_in(
            &netns,
            &["-6", "addr", "add", &address6, "dev", IFNAME, "nodad"],
        )?;
        sys::ip_in(&netns, &["link", "set", IFNAME, "up"])?;
        Ok(netns)
    }

    /// Runs `args[0] args[1..]` inside `ns` (`ip netns exec`) and collects its output; a
    /// non-zero exit is not an error.
    pub fn exec(&self, ns: &(impl Netns + ?Sized), args: &[&str]) -> Result<Output> {
        ns.exec(args)
    }

    /// Spawns `command` inside `ns`; see [`spawn_in`](super::spawn_in) for what carries over.
    /// Processes still running in a testbed namespace are killed at teardown.
    pub fn spawn_in(&self, ns: &(impl Netns + ?Sized), command: &Command) -> Result<Child> {
        ns.spawn(command)
    }

    /// Starts capturing every frame on every port of the fabric bridge: all traffic between
    /// nodes (each frame is seen twice, leaving one port and entering another).
    pub fn capture_fabric(&self) -> Result<Capture> {
        Capture::start_any(self.fabric.netns_path())
    }

    /// Kills the processes left in the testbed's namespaces and deletes the namespaces,
    /// reporting every failure (all deletions are attempted).
    pub fn teardown(mut self) -> Result<()> {
        let errors = self.teardown_inner();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Error::Teardown(errors))
        }
    }

    /// Leaves the namespaces in place (for `membrane local up`) and returns their names.
    ///
    /// With a generated prefix they survive until this process exits; a later
    /// [`Testbed::new`] in another process then sweeps them.
    pub fn detach(mut self) -> Vec<String> {
        self.finished = true;
        std::mem::take(&mut self.created)
    }

    fn teardown_inner(&mut self) -> Vec<Error> {
        self.finished = true;
        let created = std::mem::take(&mut self.created);
        let ids: Vec<sys::NsId> = created
            .iter()
            .filter_map(|name| sys::ns_id(&sys::netns_path(name)))
            .collect();
        sys::kill_all_in(&ids);
        let mut errors = Vec::new();
        for name in created.iter().rev() {
            if !sys::netns_path(name).exists() {
                continue;
            }
            if let Err(e) = sys::netns_del(name) {
                errors.push(e);
            }
        }
        // Processes that entered while the first pass ran (the identities outlive the names).
        sys::kill_all_in(&ids);
        if let Some(n) = self.generated {
            naming::release(n);
        }
        errors
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        for error in self.teardown_inner() {
            eprintln!("netns testbed {}: teardown: {error}", self.id);
        }
    }
}

/// In `from`'s namespace: `to`'s pod CIDR via `to`'s fabric address.
/// The IPv6 fabric address of an external host at `fabric_ip`.
pub fn external_ip6(fabric_ip: Ipv4Addr) -> std::net::Ipv6Addr {
    let s = FABRIC_SUBNET6.segments();
    std::net::Ipv6Addr::new(s[0], s[1], 0, 0, 0, 0, 0, u16::from(fabric_ip.octets()[3]))
}

fn route_pods_via(from: &Node, to: &Node) -> Result<()> {
    sys::ip_in(
        &from.netns,
        &[
            "-6",
            "route",
            "add",
            &to.pod_cidr6(),
            "via",
            &to.fabric_ip6().to_string(),
            "dev",
            IFNAME,
        ],
    )?;
    sys::ip_in(
        &from.netns,
        &[
            "route",
            "add",
            &to.pod_cidr.to_string(),
            "via",
            &to.fabric_ip.to_string(),
            "dev",
            IFNAME,
        ],
    )
}
