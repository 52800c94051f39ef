"""Writes and checks OCI image archives without a registry or a container daemon.

    oci_image.py build ROOTFS OUT.tar --ref NAME:TAG --entrypoint JSON [--cmd JSON]
                       [--user U] [--env K=V]... [--label K=V]...
    oci_image.py verify ARCHIVE.tar DEST_DIR [--ref NAME:TAG]

build: one gzip layer of ROOTFS, the image config, the manifest and index.json with the
org.opencontainers.image.ref.name annotation, packed as an OCI image layout in a tar (what
`podman load -i` and `skopeo copy oci-archive:` read). The layer is deterministic: entries
sorted, mtime 0, owner 0:0, modes normalized (directories 0755, /tmp 1777, files 0755 when
executable by their owner else 0644), so the same files give the same digests whatever the
umask, owner or timestamps of ROOTFS.

verify: unpacks ARCHIVE into DEST_DIR and checks it the way a loader does: the layout version,
one manifest in the index with a ref.name (equal to --ref when given), every blob against its
digest and size (index -> manifest -> config and layers), the config's diff_ids against the
uncompressed layers, amd64/linux, and an entrypoint that exists in the image. It extracts the
layers to DEST_DIR/rootfs (refusing entries that would land outside it) and writes what a
runtime takes from the config: DEST_DIR/image.entrypoint (NUL-separated), DEST_DIR/image.env
(one VAR=value a line) and DEST_DIR/image.user. Exits non-zero with the reason on any mismatch.
Standard library only.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import posixpath
import stat
import sys
import tarfile

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"


def fail(message):
    sys.exit(f"oci_image: {message}")


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(value):
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def normalized(info):
    """The entry with the metadata that must not depend on where ROOTFS was assembled."""
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if info.isdir():
        info.mode = 0o1777 if info.name == "tmp" else 0o755
    elif info.issym():
        info.mode = 0o777
    elif info.isreg():
        info.mode = 0o755 if info.mode & stat.S_IXUSR else 0o644
    else:
        fail(f"{info.name}: only directories, regular files and symlinks go into an image")
    return info


def layer_tar(rootfs):
    entries = []
    for dirpath, dirnames, filenames in os.walk(rootfs):
        for name in dirnames + filenames:
            entries.append(os.path.relpath(os.path.join(dirpath, name), rootfs))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        # A path sorts after its parent directory, so every directory precedes its contents.
        for rel in sorted(entries):
            path = os.path.join(rootfs, rel)
            info = normalized(tar.gettarinfo(path, arcname=rel))
            if info.islnk():
                fail(f"{rel}: hard links are not supported")
            if info.isreg():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return buf.getvalue()


def pairs(items, what):
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"{what} {item!r} is not KEY=VALUE")
        out[key] = value
    return out


def build(args):
    raw = layer_tar(args.rootfs)
    layer = gzip.compress(raw, compresslevel=6, mtime=0)
    image_config = {"Entrypoint": args.entrypoint, "Env": args.env}
    if args.cmd:
        image_config["Cmd"] = args.cmd
    if args.user:
        image_config["User"] = args.user
    labels = pairs(args.label, "label")
    if labels:
        image_config["Labels"] = labels
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": image_config,
        "rootfs": {"type": "layers", "diff_ids": [sha256(raw)]},
        "history": [{"created_by": "scripts/build-images.sh"}],
    }
    config_bytes = canonical_json(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": sha256(config_bytes), "size": len(config_bytes)},
        "layers": [{"mediaType": MEDIA_LAYER, "digest": sha256(layer), "size": len(layer)}],
    }
    manifest_bytes = canonical_json(manifest)
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": MEDIA_MANIFEST,
                "digest": sha256(manifest_bytes),
                "size": len(manifest_bytes),
                "annotations": {REF_NAME: args.ref},
            }
        ],
    }
    files = {
        "oci-layout": canonical_json({"imageLayoutVersion": "1.0.0"}),
        "index.json": canonical_json(index),
    }
    for data in (layer, config_bytes, manifest_bytes):
        files["blobs/sha256/" + sha256(data).split(":", 1)[1]] = data
    tmp = args.out + ".tmp"
    try:
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
        os.replace(tmp, args.out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(
        f"{args.out}: {args.ref}, manifest {sha256(manifest_bytes)}, "
        f"layer {len(layer)} bytes ({len(raw)} uncompressed)"
    )


def checked_members(tar, what):
    """The archive's members, refusing any that would be written outside the destination:
    absolute or `..` names, hard links to such names, and paths through a symlink the archive
    itself created (which could point anywhere on this machine)."""
    def inside(path):
        path = posixpath.normpath(path)
        if path.startswith("/") or path == ".." or path.startswith("../"):
            fail(f"{what}: unsafe entry name {path!r}")
        return path

    members = tar.getmembers()
    symlinks = set()
    for m in members:
        if m.isdev() or m.isfifo():
            fail(f"{what}: {m.name}: device or FIFO entry")
        name = inside(m.name)
        if m.islnk():
            inside(m.linkname)
        parts = name.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in symlinks:
                fail(f"{what}: {m.name} goes through the symlink {parent}")
        if m.issym():
            symlinks.add(name)
    return members


def extract(tar, dest, what):
    members = checked_members(tar, what)
    # The names were checked above; keep modes (the sticky /tmp) and numeric owners as stored.
    kwargs = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
    tar.extractall(dest, members=members, numeric_owner=True, **kwargs)


def blob(root, descriptor, media_type):
    digest = descriptor.get("digest", "")
    if descriptor.get("mediaType") != media_type:
        fail(f"blob {digest} has media type {descriptor.get('mediaType')!r}, not {media_type}")
    algorithm, _, hexdigest = digest.partition(":")
    if algorithm != "sha256" or len(hexdigest) != 64:
        fail(f"unsupported digest {digest!r}")
    path = os.path.join(root, "blobs", "sha256", hexdigest)
    if not os.path.isfile(path):
        fail(f"missing blob {digest}")
    with open(path, "rb") as f:
        data = f.read()
    if sha256(data) != digest:
        fail(f"blob {digest} does not match its digest")
    if len(data) != descriptor.get("size"):
        fail(f"blob {digest} is {len(data)} bytes, the descriptor says {descriptor.get('size')}")
    return data


def verify(args):
    dest = args.dest
    with tarfile.open(args.archive) as tar:
        extract(tar, dest, args.archive)
    try:
        with open(os.path.join(dest, "oci-layout")) as f:
            layout = json.load(f)
        with open(os.path.join(dest, "index.json")) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"{args.archive} is not an OCI image layout: {e}")
    if layout.get("imageLayoutVersion") != "1.0.0":
        fail("not an OCI image layout 1.0.0")
    if len(index.get("manifests", [])) != 1:
        fail("index.json must name exactly one manifest")
    descriptor = index["manifests"][0]
    ref = descriptor.get("annotations", {}).get(REF_NAME)
    if not ref:
        fail(f"the manifest has no {REF_NAME}")
    if args.ref and ref != args.ref:
        fail(f"the image is named {ref}, expected {args.ref}")
    manifest = json.loads(blob(dest, descriptor, MEDIA_MANIFEST))
    config = json.loads(blob(dest, manifest["config"], MEDIA_CONFIG))
    if (config.get("architecture"), config.get("os")) != ("amd64", "linux"):
        fail(f"the image is for {config.get('os')}/{config.get('architecture')}, not linux/amd64")
    diff_ids = config.get("rootfs", {}).get("diff_ids", [])
    if len(manifest["layers"]) != len(diff_ids):
        fail("layers and diff_ids differ in number")
    rootfs = os.path.join(dest, "rootfs")
    os.makedirs(rootfs)
    for layer_desc, diff_id in zip(manifest["layers"], diff_ids):
        raw = gzip.decompress(blob(dest, layer_desc, MEDIA_LAYER))
        if sha256(raw) != diff_id:
            fail(f"layer {layer_desc['digest']} does not match its diff_id")
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            extract(tar, rootfs, f"layer {layer_desc['digest']}")
    image_config = config.get("config", {})
    entrypoint = image_config.get("Entrypoint") or []
    if not entrypoint:
        fail("the image has no entrypoint")
    target = os.path.join(rootfs, entrypoint[0].lstrip("/"))
    if not os.path.isfile(target) or not os.stat(target).st_mode & stat.S_IXUSR:
        fail(f"the entrypoint {entrypoint[0]} is not an executable file in the image")
    with open(os.path.join(dest, "image.entrypoint"), "wb") as f:
        f.write(b"".join(arg.encode() + b"\0" for arg in entrypoint))
    with open(os.path.join(dest, "image.env"), "w") as f:
        f.write("".join(f"{var}\n" for var in image_config.get("Env", [])))
    with open(os.path.join(dest, "image.user"), "w") as f:
        f.write(image_config.get("User", ""))
    print(
        f"{args.archive}: {ref}, manifest {descriptor['digest']}: digests and sizes match, "
        f"entrypoint {json.dumps(entrypoint)}, user {image_config.get('User') or 'root'}"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("rootfs")
    b.add_argument("out")
    b.add_argument("--ref", required=True)
    b.add_argument("--entrypoint", type=json.loads, required=True)
    b.add_argument("--cmd", type=json.loads, default=[])
    b.add_argument("--user", default="")
    b.add_argument("--env", action="append", default=[])
    b.add_argument("--label", action="append", default=[])
    v = sub.add_parser("verify")
    v.add_argument("archive")
    v.add_argument("dest")
    v.add_argument("--ref", default="")
    args = parser.parse_args()
    if args.command == "build":
        build(args)
    else:
        verify(args)


if __name__ == "__main__":
    main()
