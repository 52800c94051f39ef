//! `membrane policy ingress`: where would an ingress gateway send a connection? The gateways
//! and routes of a manifest directory (Gateway API `Gateway`, `TCPRoute`, `TLSRoute`) are
//! compiled against its Services exactly as the controller compiles them; the answer is the
//! route and backends for (port, server name), or why there is none. Each route is accepted or
//! refused on its own, as the controller does it: the routes of the gateway that were left out
//! are listed after the answer with their reason and every error's field path, and then the
//! command exits 1.

use std::path::PathBuf;

use anyhow::{Context, bail};
use membrane_ca::source::directory::DirectorySource;
use serde_json::json;

/// The command line of `membrane policy ingress`.
#[derive(Debug, clap::Args)]
pub struct IngressArgs {
    /// Directory of manifests (Services, Gateways, TCPRoutes, TLSRoutes).
    #[arg(long)]
    pub manifests: PathBuf,
    /// The gateway, NAMESPACE/NAME.
    #[arg(long)]
    pub gateway: String,
    /// The listener port the connection arrives on.
    #[arg(long)]
    pub port: u16,
    /// The server name of its ClientHello (TLS listeners).
    #[arg(long)]
    pub sni: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Answers; `Ok(false)` when a route of the gateway was refused (the answer is the one the
/// gateway gives without it).
pub fn ingress(args: &IngressArgs) -> anyhow::Result<bool> {
    let mut source = DirectorySource::new(&args.manifests);
    source.rescan().map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(e) = source.errors().first() {
        bail!("{e}");
    }
    let state = source.state();
    let (namespace, name) = args
        .gateway
        .split_once('/')
        .context("--gateway must be NAMESPACE/NAME")?;
    let mut tables = state.ingress_tables();
    let table = tables
        .remove(&(namespace.to_owned(), name.to_owned()))
        .with_context(|| {
            format!(
                "no Gateway {namespace}/{name} in {}",
                args.manifests.display()
            )
        })?;
    let refused = &table.refused;
    let sni = args.sni.as_deref().map(str::to_ascii_lowercase);
    let answer = table.table.route(args.port, sni.as_deref());
    if args.json {
        let mut out = match answer {
            Ok(t) => json!({"routed": true, "route": t.route, "backends": t.backends.iter()
                .map(|b| format!("{}/{}:{}", b.namespace, b.service, b.port)).collect::<Vec<_>>()}),
            Err(miss) => json!({"routed": false, "reason": miss.as_str()}),
        };
        out["refused_routes"] = refused
            .iter()
            .map(|r| {
                json!({
                    "kind": r.kind.as_str(),
                    "route": r.key(),
                    "reason": r.reason.as_str(),
                    "errors": r.errors.iter().map(|e| json!({"field": e.path, "error": e.message}))
                        .collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{out}");
        return Ok(refused.is_empty());
    }
    match answer {
        Ok(t) => {
            println!("ROUTED");
            println!("route: {}", t.route);
            for b in &t.backends {
                println!(
                    "backend: Service {}/{} port {}",
                    b.namespace, b.service, b.port
                );
            }
        }
        Err(miss) => {
            println!("REFUSED");
            println!("why: {}", miss.as_str());
        }
    }
    for route in refused {
        for e in &route.errors {
            println!("route refused ({}): {e}", route.reason);
        }
    }
    Ok(refused.is_empty())
}
