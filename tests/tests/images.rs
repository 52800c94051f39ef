//! The container images: `scripts/build-images.sh` assembles both images from the workspace's
//! binaries, writes them as OCI archives (no registry, no daemon) and verifies them — every
//! blob against its digest, and every binary run inside the unpacked image with chroot, which
//! needs root.

use std::process::Command;

use anyhow::{Context, ensure};

#[test]
#[ignore = "needs root"]
fn both_images_build_as_oci_archives_and_their_binaries_run_inside() -> anyhow::Result<()> {
    membrane_tests::require_root()?;
    let bin_dir = membrane_tests::mesh::ztunnel_binary()?
        .parent()
        .context("binary directory")?
        .to_owned();
    let out = tempfile::tempdir()?;
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("repository root")?;
    let run = Command::new("bash")
        .arg(repo.join("scripts/build-images.sh"))
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--out")
        .arg(out.path())
        .output()?;
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    ensure!(
        run.status.success(),
        "build-images failed:\n{stdout}\n{stderr}"
    );
    for (archive, reference, version) in [
        (
            "membrane-ca.oci.tar",
            "ghcr.io/membrane-mesh/membrane-ca:",
            "membrane-ca ",
        ),
        (
            "ztunnel.oci.tar",
            "ghcr.io/membrane-mesh/ztunnel:",
            "ztunnel ",
        ),
    ] {
        let path = out.path().join(archive);
        ensure!(path.metadata()?.len() > 1_000_000, "{archive} is too small");
        ensure!(stdout.contains(reference), "no {reference} in:\n{stdout}");
        ensure!(
            stdout.contains(version),
            "{version}--version did not run:\n{stdout}"
        );
    }
    for tool in [
        "nftables v",
        "jq-",
        "\"cniVersion\"",
        "both images verified",
    ] {
        ensure!(
            stdout.contains(tool),
            "no {tool:?} in the verification:\n{stdout}"
        );
    }
    Ok(())
}
