//! `membrane`: the command-line tool for Membrane users.
//!
//! Today it runs `membrane demo`, a guided tour of the mesh's identity layer on one machine.
//! The local mesh (`membrane local up`), policy tooling and `observe` arrive with their
//! pieces of work (see `docs/design.md`).

// Printing to stdout is this binary's job.
#![allow(clippy::print_stdout)]

mod dataplane;
mod demo;
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
    /// Validate AuthorizationPolicy files: every error and warning with its field path.
    Check {
        /// Files to check.
        #[arg(required = true)]
        files: Vec<std::path::PathBuf>,
    },
    /// Would this source reach that workload on that port, and which policy decides?
    Explain {
        /// Directory of manifests (Namespaces, Pods with labels, AuthorizationPolicies).
        #[arg(long)]
        manifests: std::path::PathBuf,
        /// Source SPIFFE ID, or `none` for a plaintext source without identity.
        #[arg(long)]
        from: String,
        /// Destination as NAMESPACE/POD.
        #[arg(long)]
        to: String,
        /// Destination port.
        #[arg(long)]
        port: u16,
        /// Source IP (for ipBlocks and source.ip conditions).
        #[arg(long, default_value = "0.0.0.0")]
        source_ip: std::net::IpAddr,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check and explain AuthorizationPolicy.
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
        Command::Policy(PolicyCommand::Check { files }) => {
            if policy::check(&files)? {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
        Command::Policy(PolicyCommand::Explain {
            manifests,
            from,
            to,
            port,
            source_ip,
            json,
        }) => policy::explain(&policy::ExplainArgs {
            manifests,
            from,
            to,
            port,
            source_ip,
            json,
        }),
    }
}
