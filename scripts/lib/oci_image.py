"""Writes and checks OCI image archives without a registry or a container daemon.

    oci_image.py build ROOTFS OUT.tar --ref NAME:TAG --entrypoint JSON [--cmd JSON] [--user U]
    oci_image.py verify ARCHIVE.tar DEST_DIR

build: one gzip layer of ROOTFS (sorted entries, mtime 0, owner 0:0, so the same files give
the same digest), the image config, the manifest and index.json with the
org.opencontainers.image.ref.name annotation, packed as an OCI image layout in a tar (what
`podman load -i` and `skopeo copy oci-archive:` read). verify: unpacks ARCHIVE into DEST_DIR,
checks every blob against its digest and size (index -> manifest -> config and layer, and the
config's diff_id against the uncompressed layer), and extracts the layer to DEST_DIR/rootfs.
Exits non-zero with the reason on any mismatch. Standard library only.
"""

import gzip
import hashlib
import io
import json
import os
import sys
import tarfile

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def fail(message):
    sys.exit(f"oci_image: {message}")


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(rootfs):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        entries = []
        for dirpath, dirnames, filenames in os.walk(rootfs):
            dirnames.sort()
            for name in sorted(dirnames + filenames):
                entries.append(os.path.join(dirpath, name))
        for path in sorted(entries):
            info = tar.gettarinfo(path, arcname=os.path.relpath(path, rootfs))
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if info.isreg():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return buf.getvalue()


def build(rootfs, out, ref, entrypoint, cmd, user):
    raw = layer_tar(rootfs)
    layer = gzip.compress(raw, mtime=0)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": entrypoint,
            "Cmd": cmd,
            "User": user,
            "Env": ["PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        },
        "rootfs": {"type": "layers", "diff_ids": [sha256(raw)]},
        "history": [{"created_by": "scripts/build-images.sh"}],
    }
    if not cmd:
        del config["config"]["Cmd"]
    if not user:
        del config["config"]["User"]
    config_bytes = json.dumps(config, sort_keys=True).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": sha256(config_bytes), "size": len(config_bytes)},
        "layers": [{"mediaType": MEDIA_LAYER, "digest": sha256(layer), "size": len(layer)}],
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": MEDIA_MANIFEST,
                "digest": sha256(manifest_bytes),
                "size": len(manifest_bytes),
                "annotations": {"org.opencontainers.image.ref.name": ref},
            }
        ],
    }
    files = {
        "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
        "index.json": json.dumps(index, sort_keys=True).encode(),
    }
    for blob in (layer, config_bytes, manifest_bytes):
        files["blobs/sha256/" + sha256(blob).split(":", 1)[1]] = blob
    tmp = out + ".tmp"
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ["blobs", "blobs/sha256"]:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(files[name]))
    os.replace(tmp, out)
    print(f"{out}: {ref}, manifest {sha256(manifest_bytes)}, layer {len(layer)} bytes")


def blob(root, descriptor):
    digest = descriptor["digest"]
    path = os.path.join(root, "blobs", *digest.split(":", 1))
    if not os.path.isfile(path):
        fail(f"missing blob {digest}")
    with open(path, "rb") as f:
        data = f.read()
    if sha256(data) != digest:
        fail(f"blob {digest} does not match its digest")
    if len(data) != descriptor["size"]:
        fail(f"blob {digest} is {len(data)} bytes, the descriptor says {descriptor['size']}")
    return data


def verify(archive, dest):
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    with open(os.path.join(dest, "oci-layout")) as f:
        if json.load(f).get("imageLayoutVersion") != "1.0.0":
            fail("not an OCI image layout 1.0.0")
    with open(os.path.join(dest, "index.json")) as f:
        index = json.load(f)
    if len(index.get("manifests", [])) != 1:
        fail("index.json must name exactly one manifest")
    descriptor = index["manifests"][0]
    ref = descriptor.get("annotations", {}).get("org.opencontainers.image.ref.name")
    if not ref:
        fail("the manifest has no org.opencontainers.image.ref.name")
    manifest = json.loads(blob(dest, descriptor))
    config = json.loads(blob(dest, manifest["config"]))
    if len(manifest["layers"]) != len(config["rootfs"]["diff_ids"]):
        fail("layers and diff_ids differ in number")
    rootfs = os.path.join(dest, "rootfs")
    os.makedirs(rootfs)
    for layer_desc, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"]):
        raw = gzip.decompress(blob(dest, layer_desc))
        if sha256(raw) != diff_id:
            fail(f"layer {layer_desc['digest']} does not match its diff_id")
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            tar.extractall(rootfs, filter="tar")
    print(json.dumps({"ref": ref, "entrypoint": config["config"].get("Entrypoint")}))


def main(argv):
    if len(argv) >= 3 and argv[1] == "verify":
        verify(argv[2], argv[3])
        return
    if len(argv) < 4 or argv[1] != "build":
        fail(__doc__)
    rootfs, out = argv[2], argv[3]
    opts = dict(zip(argv[4::2], argv[5::2]))
    build(
        rootfs,
        out,
        opts["--ref"],
        json.loads(opts["--entrypoint"]),
        json.loads(opts.get("--cmd", "[]")),
        opts.get("--user", ""),
    )


if __name__ == "__main__":
    main(sys.argv)
