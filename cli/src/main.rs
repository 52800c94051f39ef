//! `membrane`: the command-line tool for Membrane users.
//!
//! `membrane demo` (a guided tour on one machine), `membrane local` (a real mesh on one host
//! from a manifest directory: `up`, `status`, `down`), `membrane observe` (its connection
//! records, live) and `membrane policy` (`check`, `explain`).

// Printing to stdout is this binary's job.
#![allow(clippy::print_stdout)]

mod dataplane;
mod dataplane_egress;
mod dataplane_ingress;
mod demo;
mod egress_explain;
mod ingress;
mod local;
mod narrator;
mod observe;
mod policy;

use clap::{Parser, Subcommand};

/// Membrane: a sidecar-free service mesh for GenAI pipelines.
#[derive(Debug, Parser)]
#[command(name = "membrane", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Validate AuthorizationPolicy, EgressPolicy and Gateway API files: every error and
    /// warning with its field path.
    Check {
        /// Files to check.
        #[arg(required = true)]
        files: Vec<std::path::PathBuf>,
        /// The controller's --root-namespace
        #[arg(long, value_name = "NS", default_value = membrane_policy::DEFAULT_ROOT_NAMESPACE)]
        root_namespace: String,
    },
    /// Would this source reach that workload on that port, and which policy decides?
    Explain(policy::ExplainArgs),
    /// Where would an ingress gateway send a connection on this port with this server name?
    Ingress(ingress::IngressArgs),
}

#[derive(Debug, Subcommand)]
enum LocalCommand {
    /// Build a mesh on this host from a directory of manifests (Namespaces labelled
    /// `membrane.dev/mesh=enabled`, Pods with `spec.nodeName` and service accounts, Services,
    /// AuthorizationPolicies) and leave it running in the background. Each pod becomes a
    /// network namespace named `<namespace>-<pod>`; returns once every pod is enrolled and
    /// every identity issued. Needs root.
    Up {
        /// The manifest directory (edits to its Services and policies apply live).
        dir: std::path::PathBuf,
        /// Where the state, the logs and the access records are kept.
        #[arg(long, default_value = local::DEFAULT_STATE_DIR)]
        state_dir: std::path::PathBuf,
        /// Workload certificate lifetime (e.g. `6s` to watch rotation happen); default 24 h.
        #[arg(long, value_parser = humantime::parse_duration)]
        cert_ttl: Option<std::time::Duration>,
        /// Prefix of the simulated nodes' network namespaces (`<prefix>-node-a`).
        #[arg(long, default_value = local::NODE_PREFIX, hide = true)]
        prefix: String,
    },
    /// Pods, their namespaces, IPs, nodes and identities, certificate expiry and the policies
    /// each node enforces.
    Status {
        /// State directory of the mesh.
        #[arg(long, default_value = local::DEFAULT_STATE_DIR)]
        state_dir: std::path::PathBuf,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Stop the local mesh and remove everything it created (namespaces, rules, processes).
    Down {
        /// State directory of the mesh.
        #[arg(long, default_value = local::DEFAULT_STATE_DIR)]
        state_dir: std::path::PathBuf,
    },
    /// Runs the mesh in the foreground (what `up` starts in the background).
    #[command(hide = true)]
    Daemon {
        dir: std::path::PathBuf,
        #[arg(long)]
        state_dir: std::path::PathBuf,
        #[arg(long, value_parser = humantime::parse_duration)]
        cert_ttl: Option<std::time::Duration>,
        #[arg(long, default_value = local::NODE_PREFIX)]
        prefix: String,
    },
}

#[derive(Debug, Subcommand)]
enum Command {
    /// A real mesh on this host from a directory of manifests.
    #[command(subcommand)]
    Local(LocalCommand),
    /// Watch the connection and DNS records of the local mesh: source and destination
    /// identity, verdict and deciding policy, bytes; each pod's DNS queries and answers, and
    /// the name and SNI of connections leaving the mesh.
    Observe {
        /// Only connections from or to these namespaces (repeatable).
        #[arg(long = "namespace", short = 'n')]
        namespaces: Vec<String>,
        /// Only connections from or to this SPIFFE ID.
        #[arg(long)]
        identity: Option<String>,
        /// Only DNS queries for this name (or names under it) and connections to it.
        #[arg(long)]
        name: Option<String>,
        /// Print what was recorded so far and exit instead of following.
        #[arg(long)]
        no_follow: bool,
        /// Print the records as JSON lines.
        #[arg(long)]
        json: bool,
        /// State directory of the mesh.
        #[arg(long, default_value = local::DEFAULT_STATE_DIR)]
        state_dir: std::path::PathBuf,
    },
    /// Check and explain AuthorizationPolicy and EgressPolicy.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Run a guided demo: identities issued and refused, then (as root) a two-node mesh in
    /// network namespaces with one ztunnel per node — traffic encrypted on the wire, plaintext
    /// callers refused. Leaves nothing behind.
    Demo {
        /// Print one JSON object per step instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The demo narrates refusals itself; the controller's own log lines stay quiet unless
    // RUST_LOG asks for them.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Demo { json } => runtime.block_on(demo::run(json)),
        Command::Local(LocalCommand::Up {
            dir,
            state_dir,
            cert_ttl,
            prefix,
        }) => local::up(&dir, &state_dir, cert_ttl, &prefix),
        Command::Local(LocalCommand::Status { state_dir, json }) => {
            runtime.block_on(local::status(&state_dir, json))
        }
        Command::Local(LocalCommand::Down { state_dir }) => local::down(&state_dir),
        Command::Local(LocalCommand::Daemon {
            dir,
            state_dir,
            cert_ttl,
            prefix,
        }) => runtime.block_on(local::daemon(&dir, &state_dir, cert_ttl, &prefix)),
        Command::Observe {
            namespaces,
            identity,
            name,
            no_follow,
            json,
            state_dir,
        } => runtime.block_on(observe::run(
            &state_dir.join("access.log"),
            &observe::Filter {
                namespaces,
                identity,
                name,
            },
            !no_follow,
            json,
        )),
        Command::Policy(PolicyCommand::Check {
            files,
            root_namespace,
        }) => {
            if policy::check(&files, &root_namespace)? {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
        Command::Policy(PolicyCommand::Explain(args)) => policy::explain(&args),
        Command::Policy(PolicyCommand::Ingress(args)) => {
            if ingress::ingress(&args)? {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
    }
}
