//! The container images the chart names: `scripts/build-images.sh` assembles both from the
//! workspace's binaries and writes them as OCI archives (no registry, no daemon), and
//! `scripts/verify-images.sh` checks them — every blob against its digest, then every binary
//! run inside the unpacked image with chroot, nft applying a pod's table, and the chart's CNI
//! install step run in the ztunnel image against a fake node — which needs root.
//!
//! Here: both archives are built and verified, carry the name the chart pulls (read from the
//! archive itself), come out byte-identical from a second build, and an image missing a
//! library fails verification naming it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, ensure};

fn repo_root() -> anyhow::Result<PathBuf> {
    Ok(Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("repository root")?
        .to_owned())
}

/// Runs `bash SCRIPT ARGS…` from the repository; the output, whatever the exit status.
fn script(name: &str, args: &[&Path]) -> anyhow::Result<Output> {
    let root = repo_root()?;
    Command::new("bash")
        .arg(root.join(name))
        .args(args)
        .current_dir(&root)
        .output()
        .with_context(|| format!("running {name}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The chart's appVersion, the tag of both images.
fn app_version() -> anyhow::Result<String> {
    let chart = std::fs::read_to_string(repo_root()?.join("charts/membrane/Chart.yaml"))?;
    let line = chart
        .lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .context("no appVersion in Chart.yaml")?;
    Ok(line.trim().trim_matches('"').to_owned())
}

/// The `org.opencontainers.image.ref.name` of the archive's one manifest, read with tar.
fn ref_name(archive: &Path) -> anyhow::Result<String> {
    let out = Command::new("tar")
        .arg("-xOf")
        .arg(archive)
        .arg("index.json")
        .output()?;
    ensure!(
        out.status.success(),
        "no index.json in {}",
        archive.display()
    );
    let index: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(
        index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]
            .as_str()
            .context("no ref.name")?
            .to_owned(),
    )
}

#[test]
#[ignore = "needs root"]
fn both_images_build_verify_and_rebuild_identically() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    let bin_dir = membrane_tests::mesh::ztunnel_binary()?
        .parent()
        .context("binary directory")?
        .to_owned();
    let tmp = tempfile::tempdir()?;
    let (first, second) = (tmp.path().join("first"), tmp.path().join("second"));

    let built = script(
        "scripts/build-images.sh",
        &[Path::new("--bin-dir"), &bin_dir, Path::new("--out"), &first],
    )?;
    let log = text(&built);
    ensure!(built.status.success(), "build-images failed:\n{log}");
    for line in [
        "membrane-ca: entrypoint --version as 65532:65532",
        "ztunnel: entrypoint --version as root (DaemonSet)",
        "ztunnel: entrypoint --version as 65532:65532 (gateways)",
        "ztunnel image: nft -f - then nft -j list (a pod's table)",
        "ztunnel image: jq --version",
        "ztunnel image: /bin/sh -c true",
        "ztunnel image: membrane-cni answers as a CNI plugin",
        "install-cni.sh run: plugin installed, entry chained, readiness check passes",
        "install-cni.sh on TERM: plugin and entry removed",
    ] {
        ensure!(
            log.lines()
                .any(|l| l.trim_start().starts_with(&format!("ok  {line}"))),
            "the verification did not report {line:?} as ok:\n{log}"
        );
    }
    ensure!(
        log.contains("verify-images: both images verified"),
        "no verdict:\n{log}"
    );
    let version = app_version()?;
    for image in ["membrane-ca", "ztunnel"] {
        let archive = first.join(format!("{image}.oci.tar"));
        ensure!(
            archive.metadata()?.len() > 1_000_000,
            "{image}.oci.tar is too small"
        );
        let expected = format!("ghcr.io/membrane-mesh/{image}:{version}");
        ensure!(
            ref_name(&archive)? == expected,
            "{image}.oci.tar is not named {expected}"
        );
        // The build context of images/<image>/Containerfile is kept beside the archive.
        ensure!(
            first
                .join(format!("{image}/rootfs/usr/local/bin/{image}"))
                .is_file(),
            "no build context for {image}"
        );
    }

    // Same binaries, same machine: the same bytes.
    let rebuilt = script(
        "scripts/build-images.sh",
        &[
            Path::new("--bin-dir"),
            &bin_dir,
            Path::new("--out"),
            &second,
            Path::new("--no-verify"),
        ],
    )?;
    ensure!(
        rebuilt.status.success(),
        "second build failed:\n{}",
        text(&rebuilt)
    );
    for archive in ["membrane-ca.oci.tar", "ztunnel.oci.tar"] {
        ensure!(
            std::fs::read(first.join(archive))? == std::fs::read(second.join(archive))?,
            "{archive} differs between two builds of the same binaries"
        );
    }

    // An image without jq's library: verification fails and says which.
    let rootfs = second.join("ztunnel/rootfs");
    let lib_dir = rootfs.join("lib/x86_64-linux-gnu");
    let mut removed = 0;
    for entry in std::fs::read_dir(&lib_dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with("libjq.so") {
            std::fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    ensure!(removed > 0, "no libjq in {}", lib_dir.display());
    let repack = Command::new("python3")
        .arg(repo_root()?.join("scripts/lib/oci_image.py"))
        .arg("build")
        .arg(&rootfs)
        .arg(second.join("ztunnel.oci.tar"))
        .args([
            "--ref",
            &format!("ghcr.io/membrane-mesh/ztunnel:{version}"),
            "--entrypoint",
            r#"["/usr/local/bin/ztunnel"]"#,
            "--env",
            "PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        ])
        .output()?;
    ensure!(repack.status.success(), "repack failed:\n{}", text(&repack));
    let broken = script("scripts/verify-images.sh", &[Path::new("--out"), &second])?;
    let log = text(&broken);
    ensure!(
        !broken.status.success(),
        "an image without libjq verified:\n{log}"
    );
    ensure!(
        log.contains("FAILED: ztunnel image: jq --version") && log.contains("libjq.so"),
        "the failure does not name jq and its library:\n{log}"
    );
    Ok(())
}
