//! `membrane`: the command-line tool for Membrane users.
//!
//! Today it runs `membrane demo`, a guided tour of the mesh's identity layer on one machine.
//! The local mesh (`membrane local up`), policy tooling and `observe` arrive with their
//! pieces of work (see `docs/design.md`).

// Printing to stdout is this binary's job.
#![allow(clippy::print_stdout)]

mod dataplane;
mod demo;

use clap::{Parser, Subcommand};

/// Membrane: a sidecar-free service mesh for GenAI pipelines.
#[derive(Debug, Parser)]
#[command(name = "membrane", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
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
    }
}
