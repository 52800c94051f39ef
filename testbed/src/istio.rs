//! Istio's ztunnel beside Membrane, for a head-to-head benchmark and interoperability checks:
//! run only when the user points `ISTIO_ZTUNNEL_BIN` at an Istio ztunnel binary they built
//! (with its `testing` feature, for the fake CA). The project never builds or ships one.
//!
//! One Istio ztunnel per node of the pods it serves, in in-pod ("shared") mode, each in a
//! network namespace of its own (its admin, stats and readiness ports then clash with
//! nothing):
//! - workloads come from a local configuration file (`LOCAL_XDS_PATH`): the pods it serves and
//!   the other HBONE pods it should know (for example Membrane's), with their node, namespace
//!   and service account; no xDS (`XDS_ADDRESS` empty), certificates from the fake CA
//!   (`FAKE_CA`, signed by the test root in Istio's source);
//! - this harness is the node agent that hands it pods: it serves the ZDS protocol on a Unix
//!   sequenced-packet socket (`INPOD_UDS`) — the ztunnel connects and says hello, gets an
//!   empty snapshot, then one `AddWorkload` per pod of its node with the pod's network
//!   namespace passed as a file descriptor (`SCM_RIGHTS`), each acknowledged;
//! - each served pod gets the redirect Istio's CNI would install, written here as an nftables
//!   table: outgoing TCP not from the ztunnel (its sockets carry mark 0x539) to 15001,
//!   incoming TCP other than to 15008 to 15006. The original-source spoofing of inbound
//!   connections is off (`ENABLE_ORIG_SRC=false`), as Membrane does not do it either, so no
//!   policy routing is needed.
//!
//! Dropping [`IstioZtunnels`] stops the processes (by PID), removes the rules and deletes the
//! namespaces it created.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::socket::{
    AddressFamily, Backlog, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr, accept, bind,
    listen, recv, sendmsg, socket,
};

use crate::netns::{command_in, exec_in, wait_listening};
use crate::reap;

/// The nftables table holding the redirect in each pod.
const TABLE: &str = "membrane-bench-istio";
/// Numbers the namespaces this process creates (several harnesses may run at once).
static NEXT_NETNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// The mark Istio's ztunnel puts on its own sockets (never redirected).
const ZTUNNEL_MARK: u32 = 0x539;

/// A pod the Istio ztunnels serve.
pub struct PodRef {
    /// Pod name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Service account (with the namespace, its identity).
    pub service_account: String,
    /// Its node.
    pub node: String,
    /// Its address.
    pub ip: std::net::Ipv4Addr,
    /// Its network namespace's name.
    pub netns: String,
    /// Its network namespace's path.
    pub netns_path: PathBuf,
}

impl PodRef {
    /// Pod `name` of `mesh`.
    pub fn of(mesh: &crate::mesh::Mesh, name: &str) -> Self {
        let def = mesh.def(name);
        let pod = mesh.pod(name);
        Self {
            name: def.name.clone(),
            namespace: def.namespace.clone(),
            service_account: def.service_account.clone(),
            node: def.node.clone(),
            ip: pod.ip(),
            netns: pod.netns_name().to_owned(),
            netns_path: pod.netns_path(),
        }
    }
}

// === ZDS messages (istio.workload.zds) ===

#[derive(Clone, PartialEq, prost::Message)]
struct WorkloadInfo {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    namespace: String,
    #[prost(string, tag = "3")]
    service_account: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct AddWorkload {
    #[prost(string, tag = "1")]
    uid: String,
    #[prost(message, optional, tag = "2")]
    workload_info: Option<WorkloadInfo>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SnapshotSent {}

#[derive(Clone, PartialEq, prost::Oneof)]
enum Payload {
    #[prost(message, tag = "1")]
    Add(AddWorkload),
    #[prost(message, tag = "3")]
    SnapshotSent(SnapshotSent),
}

#[derive(Clone, PartialEq, prost::Message)]
struct WorkloadRequest {
    #[prost(oneof = "Payload", tags = "1, 3")]
    payload: Option<Payload>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Ack {
    #[prost(string, tag = "1")]
    error: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct WorkloadResponse {
    #[prost(message, optional, tag = "1")]
    ack: Option<Ack>,
}

/// One ZDS connection from an Istio ztunnel: the benchmark's side.
struct Zds(OwnedFd);

impl Zds {
    /// Waits (bounded) for the ztunnel to connect to `listener`, reads its hello, sends the
    /// empty snapshot and reads its acknowledgement.
    fn accept(listener: &OwnedFd, timeout: Duration, child: &mut Child) -> anyhow::Result<Self> {
        let deadline = Instant::now() + timeout;
        let fd = loop {
            match accept(listener) {
                Ok(fd) => break fd,
                Err(nix::errno::Errno::EAGAIN) if Instant::now() < deadline => {
                    if let Some(status) = child.try_wait()? {
                        bail!(
                            "the Istio ztunnel exited ({status}) before connecting to its ZDS socket"
                        );
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => bail!("the Istio ztunnel did not connect to its ZDS socket: {e}"),
            }
        };
        // Every read below is bounded: a ztunnel that stops answering fails the start.
        nix::sys::socket::setsockopt(
            &fd,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(10, 0),
        )?;
        let zds = Self(fd);
        let mut hello = [0u8; 256];
        recv(zds.0.as_raw_fd(), &mut hello, MsgFlags::empty()).context("reading ZDS hello")?;
        zds.request(
            &WorkloadRequest {
                payload: Some(Payload::SnapshotSent(SnapshotSent {})),
            },
            None,
        )?;
        Ok(zds)
    }

    /// Sends `req` (with `fd` attached) and waits for its acknowledgement.
    fn request(&self, req: &WorkloadRequest, fd: Option<&std::fs::File>) -> anyhow::Result<()> {
        use prost::Message;
        let bytes = req.encode_to_vec();
        let iov = [IoSlice::new(&bytes)];
        let fds;
        let cmsgs: Vec<ControlMessage<'_>> = match fd {
            Some(f) => {
                fds = [f.as_raw_fd()];
                vec![ControlMessage::ScmRights(&fds)]
            }
            None => Vec::new(),
        };
        sendmsg::<UnixAddr>(self.0.as_raw_fd(), &iov, &cmsgs, MsgFlags::empty(), None)
            .context("sending a ZDS request")?;
        let mut buf = [0u8; 4096];
        let n = recv(self.0.as_raw_fd(), &mut buf, MsgFlags::empty())
            .context("reading a ZDS acknowledgement")?;
        let response = WorkloadResponse::decode(&buf[..n]).context("decoding a ZDS response")?;
        match response.ack {
            Some(Ack { error }) if error.is_empty() => Ok(()),
            Some(Ack { error }) => bail!("the Istio ztunnel refused: {error}"),
            None => bail!("the Istio ztunnel answered without an ack"),
        }
    }
}

/// Two Istio ztunnels serving the benchmark's pods; dropping it stops and removes everything.
pub struct IstioZtunnels {
    children: Vec<Child>,
    /// Kept open for the processes' lifetime (a closed ZDS connection ends in-pod serving).
    _zds: Vec<Zds>,
    namespaces: Vec<String>,
    pods_with_rules: Vec<String>,
    _dir: tempfile::TempDir,
}

impl IstioZtunnels {
    /// Starts one Istio ztunnel (`bin`) per node of `pods`, hands each its pods and redirects
    /// the pods' traffic to it. `others` are HBONE pods it should know without serving them
    /// (another data plane's); `env` is added to its environment.
    pub fn start(
        bin: &Path,
        pods: &[PodRef],
        others: &[PodRef],
        env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        let mut this = Self {
            children: Vec::new(),
            _zds: Vec::new(),
            namespaces: Vec::new(),
            pods_with_rules: Vec::new(),
            _dir: tempfile::tempdir()?,
        };
        let dir = this._dir.path().to_owned();
        let config = dir.join("local.yaml");
        let known: Vec<&PodRef> = pods.iter().chain(others).collect();
        std::fs::write(&config, local_config(&known))?;
        let mut nodes: Vec<&str> = pods.iter().map(|p| p.node.as_str()).collect();
        nodes.sort_unstable();
        nodes.dedup();
        for (i, node) in nodes.iter().enumerate() {
            let ns = format!(
                "mbt-izt-{}-{}",
                std::process::id(),
                NEXT_NETNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            );
            let out = std::process::Command::new("ip")
                .args(["netns", "add", &ns])
                .output()?;
            if !out.status.success() {
                bail!(
                    "ip netns add {ns}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            this.namespaces.push(ns.clone());
            exec_in(&ns, &["ip", "link", "set", "lo", "up"])?;
            let socket_path = dir.join(format!("zds-{i}.sock"));
            let listener = socket(
                AddressFamily::Unix,
                SockType::SeqPacket,
                SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                None,
            )?;
            bind(listener.as_raw_fd(), &UnixAddr::new(&socket_path)?)?;
            listen(&listener, Backlog::new(4)?)?;
            let mut command = command_in(&ns, bin);
            command
                .env("PROXY_MODE", "shared")
                .env("INPOD_UDS", &socket_path)
                .env("LOCAL_XDS_PATH", &config)
                .env("XDS_ADDRESS", "")
                .env("FAKE_CA", "true")
                .env("NODE_NAME", node)
                .env("ENABLE_ORIG_SRC", "false")
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null());
            command.envs(env.iter().map(|(k, v)| (k, v)));
            let mut child = command
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            let zds = Zds::accept(&listener, Duration::from_secs(20), &mut child);
            this.children.push(child);
            let zds = zds?;
            for pod in pods.iter().filter(|p| p.node == *node) {
                let netns = std::fs::File::open(&pod.netns_path)?;
                zds.request(
                    &WorkloadRequest {
                        payload: Some(Payload::Add(AddWorkload {
                            uid: uid(pod),
                            workload_info: Some(WorkloadInfo {
                                name: pod.name.clone(),
                                namespace: pod.namespace.clone(),
                                service_account: pod.service_account.clone(),
                            }),
                        })),
                    },
                    Some(&netns),
                )
                .with_context(|| format!("adding pod {}", pod.name))?;
            }
            this._zds.push(zds);
        }
        for pod in pods {
            wait_listening(&pod.netns, 15001)?;
            wait_listening(&pod.netns, 15008)?;
            redirect(&pod.netns)?;
            this.pods_with_rules.push(pod.netns.clone());
        }
        Ok(this)
    }

    /// Both processes' PIDs (what the benchmark measures).
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }

    /// TCP connections the Istio ztunnels opened so far (`istio_tcp_connections_opened_total`
    /// on their stats port, summed): proof that the traffic went through them.
    pub fn connections_opened(&self) -> anyhow::Result<f64> {
        Ok(self
            .metrics()?
            .lines()
            .filter(|l| l.starts_with("istio_tcp_connections_opened_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>())
    }

    /// Every Istio ztunnel's Prometheus text (its stats port, 15020), concatenated.
    pub fn metrics(&self) -> anyhow::Result<String> {
        use std::io::{Read, Write};
        let mut all = String::new();
        for ns in &self.namespaces {
            let text = crate::netns::run_in_netns(
                format!("/run/netns/{ns}"),
                || -> std::io::Result<String> {
                    let mut s = std::net::TcpStream::connect(("127.0.0.1", 15020))?;
                    s.set_read_timeout(Some(Duration::from_secs(5)))?;
                    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
                    let mut out = String::new();
                    s.read_to_string(&mut out)?;
                    Ok(out)
                },
            )??;
            all.push_str(&text);
        }
        Ok(all)
    }
}

impl Drop for IstioZtunnels {
    fn drop(&mut self) {
        for ns in &self.pods_with_rules {
            let _ = exec_in(ns, &["nft", "delete", "table", "ip", TABLE]);
        }
        for child in self.children.drain(..) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(0)),
                nix::sys::signal::Signal::SIGTERM,
            );
            reap(child, Duration::from_secs(3));
        }
        for ns in &self.namespaces {
            let _ = std::process::Command::new("ip")
                .args(["netns", "delete", ns])
                .output();
        }
    }
}

fn uid(pod: &PodRef) -> String {
    format!("Kubernetes//Pod/{}/{}", pod.namespace, pod.name)
}

/// The Istio ztunnels' local configuration: every pod as an HBONE workload.
fn local_config(pods: &[&PodRef]) -> String {
    let mut out = String::from("workloads:\n");
    for p in pods {
        out.push_str(&format!(
            "- uid: \"{}\"\n  name: {}\n  namespace: {}\n  serviceAccount: {}\n  workloadIps: [\"{}\"]\n  protocol: HBONE\n  trustDomain: cluster.local\n  node: {}\n  network: \"\"\n  services: {{}}\n",
            uid(p),
            p.name,
            p.namespace,
            p.service_account,
            p.ip,
            p.node
        ));
    }
    out.push_str("policies: []\nservices: []\n");
    out
}

/// The redirect in pod `ns`: what Istio's CNI installs for in-pod mode, in nftables.
fn redirect(ns: &str) -> anyhow::Result<()> {
    let rules = format!(
        "table ip {TABLE} {{\n\
         chain output {{\n  type nat hook output priority -100;\n  \
           meta mark & 0xfff == {ZTUNNEL_MARK:#x} accept\n  \
           oifname \"lo\" accept\n  \
           ip daddr 127.0.0.0/8 accept\n  \
           meta l4proto tcp redirect to :15001\n }}\n\
         chain prerouting {{\n  type nat hook prerouting priority -100;\n  \
           ip daddr 127.0.0.0/8 accept\n  \
           tcp dport 15008 accept\n  \
           meta l4proto tcp redirect to :15006\n }}\n}}\n"
    );
    let mut child = command_in(ns, "nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft")?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        stdin.write_all(rules.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("nft in {ns}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}
