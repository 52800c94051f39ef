//! The helm binary the chart tests and the real-API-server tests run: found as `$MEMBRANE_HELM`,
//! on `PATH`, or where `scripts/lib/helm.sh` caches it, and installed by that script when
//! missing. Never a silent pass: without helm, [`helm`] fails saying how to install it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail, ensure};

/// The repository root.
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// `charts/membrane`.
pub fn chart_dir() -> PathBuf {
    repo_root().join("charts/membrane")
}

fn runs(helm: &Path) -> bool {
    Command::new(helm)
        .args(["version", "--short"])
        .output()
        .is_ok_and(|out| out.status.success())
}

/// Where `scripts/lib/helm.sh` puts helm (`membrane_helm_path`).
fn cached_helm() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("MEMBRANE_HELM_DIR") {
        return Some(PathBuf::from(dir).join("helm"));
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Some(PathBuf::from(home).join(".cache/membrane/bin/helm"))
}

fn find_helm() -> Option<PathBuf> {
    let explicit = std::env::var_os("MEMBRANE_HELM").map(PathBuf::from);
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join("helm"));
    explicit
        .into_iter()
        .chain(on_path)
        .chain(cached_helm())
        .find(|candidate| candidate.is_file() && runs(candidate))
}

/// The helm binary, installed by `scripts/lib/helm.sh` if needed; `None` (skip) only when not
/// root and it cannot be had.
pub fn helm() -> anyhow::Result<PathBuf> {
    if let Some(helm) = find_helm() {
        return Ok(helm);
    }
    // One installer at a time: nextest runs every test in its own process.
    let lock = File::create(std::env::temp_dir().join("membrane-helm-install.lock"))?;
    lock.lock()?;
    if let Some(helm) = find_helm() {
        return Ok(helm);
    }
    let out = Command::new("bash")
        .args([
            "-c",
            "set -euo pipefail; source scripts/lib/helm.sh; membrane_install_helm",
        ])
        .current_dir(repo_root())
        .output()
        .context("run bash to install helm")?;
    if let Some(helm) = find_helm() {
        return Ok(helm);
    }
    // Never a silent pass: without helm these tests fail, saying how to get it.
    let stderr = String::from_utf8_lossy(&out.stderr);
    bail!(
        "helm is not installed and scripts/lib/helm.sh could not install it \
         (as root: source scripts/lib/helm.sh && membrane_install_helm):\n{stderr}"
    );
}

/// Runs helm in the repository root.
pub fn run_helm(helm: &Path, args: &[&str]) -> anyhow::Result<std::process::Output> {
    Command::new(helm)
        .args(args)
        .current_dir(repo_root())
        .output()
        .with_context(|| format!("run helm {args:?}"))
}

/// `helm template membrane charts/membrane --namespace NAMESPACE EXTRA…`: the rendered text.
pub fn template_text(namespace: &str, extra: &[&str]) -> anyhow::Result<String> {
    let helm = helm()?;
    let chart = chart_dir();
    let chart = chart.to_str().context("chart path is UTF-8")?;
    let mut args = vec!["template", "membrane", chart, "--namespace", namespace];
    args.extend_from_slice(extra);
    let out = run_helm(&helm, &args)?;
    ensure!(
        out.status.success(),
        "helm {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}
