//! `membrane local`: a real mesh on one Linux host, from a directory of manifests.
//!
//! `up` starts a background process (`membrane local daemon`, in its own process group so the
//! terminal's Ctrl-C does not reach it) that builds the mesh with the same testbed the end-to-end
//! tests use ([`membrane_testbed::mesh`]): simulated nodes and pods as network namespaces, the
//! controller, one `ztunnel` process per node, every mesh pod enrolled and its identity
//! issued, and the simulated outside world ([`membrane_testbed::world`]: a resolver for a few
//! names such as `huggingface.co`, and servers at their addresses) that every pod's DNS
//! reaches through its ztunnel. `up` returns once the daemon reports the mesh ready in the state file
//! (`<state-dir>/local.json`). The daemon keeps the controller's view of the user's Services
//! and policies in step with the directory, appends every access record to
//! `<state-dir>/access.log` (read by `membrane observe`), and tears everything down on
//! SIGTERM, which `down` sends; `down` then removes whatever a killed daemon left behind.
//!
//! A directory with `clusters.yaml` describes several federated clusters, one subdirectory
//! each ([`clusters`]): each gets its own controller and trust domain in the same daemon.

pub mod clusters;
pub mod manifests;
pub mod state;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use membrane_testbed::mesh::Mesh;
use membrane_testbed::netns::Testbed;
use membrane_testbed::world::{self, World};
use state::LocalState;

/// Where `membrane local` keeps its state unless told otherwise.
pub const DEFAULT_STATE_DIR: &str = "/run/membrane/local";
/// Prefix of the simulated nodes' namespaces (`membrane-node-a`, `membrane-fabric`).
pub const NODE_PREFIX: &str = "membrane";
/// How long `up` waits for the mesh to be ready.
pub const UP_TIMEOUT: Duration = Duration::from_secs(120);

fn state_file(dir: &Path) -> PathBuf {
    dir.join("local.json")
}

/// `membrane local up`.
pub fn up(
    manifests: &Path,
    state_dir: &Path,
    cert_ttl: Option<Duration>,
    prefix: &str,
) -> anyhow::Result<()> {
    if !membrane_testbed::is_root() {
        bail!("membrane local needs root (network namespaces, nftables): run it with sudo");
    }
    // Validate before starting anything, so errors show here and not in a log file.
    if clusters::read(manifests, cert_ttl)?.is_none() {
        manifests::spec(manifests, cert_ttl, None)?;
    }
    if let Ok(existing) = LocalState::read(&state_file(state_dir))
        && existing.daemon_alive()
    {
        bail!(
            "a local mesh is already running (pid {}, from {}); run `membrane local down` first",
            existing.pid,
            existing.manifests.display()
        );
    }
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let _ = std::fs::remove_file(state_file(state_dir));
    let log_path = state_dir.join("daemon.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let mut command = std::process::Command::new(std::env::current_exe()?);
    command
        .args(["local", "daemon"])
        .arg(std::fs::canonicalize(manifests)?)
        .arg("--state-dir")
        .arg(state_dir)
        .args(["--prefix", prefix]);
    if let Some(ttl) = cert_ttl {
        command
            .arg("--cert-ttl")
            .arg(humantime::format_duration(ttl).to_string());
    }
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = command
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the local mesh daemon")?;
    let deadline = Instant::now() + UP_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            bail!("the local mesh did not start ({status}):\n{log}");
        }
        if let Ok(state) = LocalState::read(&state_file(state_dir))
            && state.ready
        {
            state.print_summary();
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!(
                "the local mesh was not ready within {UP_TIMEOUT:?}; see {}",
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `membrane local daemon` (internal): builds the mesh and keeps it until SIGTERM.
pub async fn daemon(
    manifests_dir: &Path,
    state_dir: &Path,
    cert_ttl: Option<Duration>,
    prefix: &str,
) -> anyhow::Result<()> {
    let access_log = state_dir.join("access.log");
    std::fs::write(&access_log, b"")?;
    if let Some(clusters) = clusters::read(manifests_dir, cert_ttl)? {
        return daemon_clusters(clusters, manifests_dir, state_dir, access_log, prefix).await;
    }
    let mut spec = manifests::spec(manifests_dir, cert_ttl, Some(access_log))?;
    // Pods' DNS goes to the simulated outside world's resolver (through their ztunnel).
    spec.ztunnel_args
        .extend(["--dns-upstream".to_owned(), world::RESOLVER.to_string()]);
    let testbed = Testbed::with_prefix(prefix)?;
    let mut mesh = Mesh::start_on(testbed, spec).await?;
    let world = World::start(&mut mesh.testbed).context("starting the simulated outside world")?;
    let mut state = LocalState::from_mesh(&mesh, manifests_dir, false);
    state.write(&state_file(state_dir))?;
    for pod in mesh.pods() {
        if manifests::enrolled(mesh_spec(&mesh), pod) {
            mesh.enroll(pod.key())
                .await
                .with_context(|| format!("enrolling {}/{}", pod.namespace, pod.name))?;
        }
    }
    wait_for_identities(&mesh, &state).await?;
    state.ready = true;
    state.write(&state_file(state_dir))?;
    tracing::info!(pods = state.pods.len(), "local mesh ready");

    let mut sync = Sync::new(manifests_dir);
    until_stopped(|| sync.run(&|name, content| mesh.write_manifest(name, content))).await?;
    tracing::info!("stopping the local mesh");
    drop(world);
    drop(mesh);
    let _ = std::fs::remove_file(state_file(state_dir));
    Ok(())
}

/// The daemon of several federated clusters (see [`clusters`]).
async fn daemon_clusters(
    clusters: Vec<clusters::Cluster>,
    manifests_dir: &Path,
    state_dir: &Path,
    access_log: PathBuf,
    prefix: &str,
) -> anyhow::Result<()> {
    use membrane_testbed::TestCa;
    use membrane_testbed::mesh::NodeController;
    let (first, others) = clusters.split_first().context("no cluster")?;
    // The other clusters' controllers first: their nodes' ztunnels need their addresses.
    let mut cas = Vec::new();
    for c in others {
        let mut ca = TestCa::builder()
            .trust_domain(&c.trust_domain)
            .nodes(&c.spec.nodes)
            .bundle_endpoint(clusters::REFRESH_HINT)
            .exports();
        if let Some(ttl) = c.spec.cert_ttl {
            ca = ca.cert_ttl(ttl);
        }
        for (name, content) in manifests::other_documents(&c.dir)? {
            ca = ca.manifest(&name, &content);
        }
        cas.push(
            ca.start()
                .await
                .with_context(|| format!("starting cluster {}'s controller", c.name))?,
        );
    }
    let controllers: Vec<NodeController> = (others.iter().zip(&cas))
        .map(|(c, ca)| NodeController {
            endpoint: ca.endpoint(),
            root_pem: ca.root_pem(),
            token: String::new(),
            trust_domain: c.trust_domain.clone(),
            mesh_namespaces: c.spec.mesh_namespaces.clone(),
        })
        .collect();
    let mut spec = clusters::combined(&clusters, &controllers, Some(access_log))?;
    spec.ztunnel_args
        .extend(["--dns-upstream".to_owned(), world::RESOLVER.to_string()]);
    let testbed = Testbed::with_prefix(prefix)?;
    let mut mesh = Mesh::start_on(testbed, spec).await?;
    // Clusters meet only at their east-west gateways.
    clusters::separate(&mesh.testbed, &clusters)?;
    let world = World::start(&mut mesh.testbed).context("starting the simulated outside world")?;
    // Every cluster follows every other.
    let a = mesh.ca();
    let mut peers = vec![clusters::Peer {
        name: first.name.clone(),
        trust_domain: first.trust_domain.clone(),
        bundle_endpoint: a.bundle_endpoint_addr().context("bundle endpoint")?,
        exports: a.exports_addr().context("federation listener")?,
        root_pem: a.root_pem(),
        gateway: mesh.ip(&clusters::gateway_pod(&first.name)),
    }];
    for (c, ca) in others.iter().zip(&cas) {
        peers.push(clusters::Peer {
            name: c.name.clone(),
            trust_domain: c.trust_domain.clone(),
            bundle_endpoint: ca.bundle_endpoint_addr().context("bundle endpoint")?,
            exports: ca.exports_addr().context("federation listener")?,
            root_pem: ca.root_pem(),
            gateway: mesh.ip(&clusters::gateway_pod(&c.name)),
        });
    }
    for peer in peers.iter().filter(|p| p.name != first.name) {
        mesh.write_manifest(
            &format!("federation-{}.yaml", peer.name),
            &peer.federation(),
        )?;
    }
    for (c, ca) in others.iter().zip(&cas) {
        ca.write_manifest(
            "mesh.yaml",
            &mesh.cluster_manifests(
                &c.spec.nodes,
                &c.spec.mesh_namespaces,
                &c.spec.plaintext_permit,
            )?,
        )?;
        for peer in peers.iter().filter(|p| p.name != c.name) {
            ca.write_manifest(
                &format!("federation-{}.yaml", peer.name),
                &peer.federation(),
            )?;
        }
    }
    let mut state = LocalState::from_mesh(&mesh, manifests_dir, false);
    state.write(&state_file(state_dir))?;
    // A cluster's controller learns its pods from the file just written: enroll until it has.
    let deadline = Instant::now() + Duration::from_secs(30);
    for pod in mesh.pods() {
        if !manifests::enrolled(mesh_spec(&mesh), pod) {
            continue;
        }
        loop {
            match mesh.enroll(pod.key()).await {
                Ok(()) => break,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(pod = pod.key(), error = %e, "enrollment not yet accepted; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("enrolling {}/{}", pod.namespace, pod.name));
                }
            }
        }
    }
    wait_for_identities(&mesh, &state).await?;
    state.ready = true;
    state.write(&state_file(state_dir))?;
    tracing::info!(
        pods = state.pods.len(),
        clusters = clusters.len(),
        "local clusters ready"
    );

    let mut own = Sync::new(&first.dir);
    let mut rest: Vec<Sync> = others.iter().map(|c| Sync::new(&c.dir)).collect();
    until_stopped(|| {
        own.run(&|name, content| mesh.write_manifest(name, content));
        for (sync, ca) in rest.iter_mut().zip(&cas) {
            sync.run(&|name, content| ca.write_manifest(name, content));
        }
    })
    .await?;
    tracing::info!("stopping the local clusters");
    drop(world);
    drop(mesh);
    drop(cas);
    let _ = std::fs::remove_file(state_file(state_dir));
    Ok(())
}

/// Calls `tick` every 500 ms until SIGTERM or Ctrl-C.
async fn until_stopped(mut tick: impl FnMut()) -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = ticker.tick() => tick(),
        }
    }
}

fn mesh_spec(mesh: &Mesh) -> &membrane_testbed::mesh::MeshSpec {
    mesh.spec()
}

/// Waits until every enrolled pod's identity has a certificate on its node.
async fn wait_for_identities(mesh: &Mesh, state: &LocalState) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut missing = Vec::new();
        for pod in state.pods.iter().filter(|p| p.enrolled) {
            let dump = mesh.config_dump(&pod.node).await?;
            let issued = dump["certificates"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["identity"] == pod.identity));
            if !issued {
                missing.push(pod.identity.clone());
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("identities not issued within 30 s: {}", missing.join(", "));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Keeps the controller's copy of the user's Services and policies in step with the files.
struct Sync {
    dir: PathBuf,
    last: Vec<(String, String)>,
}

impl Sync {
    fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            last: manifests::other_documents(dir).unwrap_or_default(),
        }
    }

    fn run(&mut self, write: &dyn Fn(&str, &str) -> anyhow::Result<()>) {
        let Ok(now) = manifests::other_documents(&self.dir) else {
            return;
        };
        if now == self.last {
            return;
        }
        for (name, content) in &now {
            if !self.last.contains(&(name.clone(), content.clone()))
                && let Err(e) = write(name, content)
            {
                tracing::warn!(file = name, error = %e, "cannot pass a changed manifest on");
            }
        }
        for (name, _) in &self.last {
            if !now.iter().any(|(n, _)| n == name)
                && let Err(e) = write(name, "")
            {
                tracing::warn!(file = name, error = %e, "cannot pass a removed manifest on");
            }
        }
        tracing::info!("manifests changed; the controller picks them up");
        self.last = now;
    }
}

/// `membrane local down`.
pub fn down(state_dir: &Path) -> anyhow::Result<()> {
    let path = state_file(state_dir);
    let Ok(state) = LocalState::read(&path) else {
        println!("no local mesh is running (no {})", path.display());
        return Ok(());
    };
    if state.daemon_alive() {
        state.signal(nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while state.daemon_alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if state.daemon_alive() {
            state.signal(nix::sys::signal::Signal::SIGKILL);
        }
    }
    // Whatever a killed daemon could not remove.
    let leftovers = state.remove_leftovers();
    let _ = std::fs::remove_file(&path);
    if leftovers.is_empty() {
        println!("local mesh stopped; nothing left behind");
    } else {
        println!(
            "local mesh stopped; removed what the daemon left: {}",
            leftovers.join(", ")
        );
    }
    Ok(())
}

/// `membrane local status`.
pub async fn status(state_dir: &Path, json: bool) -> anyhow::Result<()> {
    let path = state_file(state_dir);
    let state = LocalState::read(&path).with_context(|| {
        format!(
            "no local mesh state at {} — start one with `membrane local up DIR`",
            path.display()
        )
    })?;
    let live = state.live_view().await;
    if json {
        println!("{}", serde_json::to_string_pretty(&live)?);
    } else {
        state::print_live(&live);
    }
    Ok(())
}
