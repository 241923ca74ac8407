#!/usr/bin/env bash
# Builds the dispynode image without a container engine: the same image as node-image/Dockerfile
# (Debian bookworm with python3, dispynode, dispynetrelay, dispyscheduler and the node's health
# check, user dispy 10001:10001,
# ENTRYPOINT ["dispynode"], 9701/tcp and 9701/udp, the same labels), as an OCI image layout
# and a `docker load`-able tarball.
#
#   node-image/image/build.sh [--out DIR] [--binary PATH] [--relay-binary PATH]
#                             [--scheduler-binary PATH] [--tag TAG] [--refresh]
#
# --binary, --relay-binary and --scheduler-binary take built dispynode, dispynetrelay and
# dispyscheduler binaries (the last two default to the ones beside --binary); without them,
# cargo builds all three in release mode.
#
# Tools, all Debian packages: mmdebstrap (root filesystem), umoci (OCI layout: layers, config),
# skopeo (OCI layout -> docker-archive). Runs as root (mmdebstrap's root mode).
#
# The root filesystem is the slow part (about a minute, downloaded from Debian's mirror); it is
# cached under $DISPY_IMAGE_CACHE (default /var/cache/dispy-image) keyed by everything that goes
# into it, so a rebuild takes seconds. --refresh rebuilds it (to pick up Debian updates).
#
# Layers: 1 = the Debian root filesystem with python3 and the dispy user; 2 = dispynode,
# dispynetrelay, dispyscheduler and dispynode-healthcheck in /usr/local/bin. The image's files and config are reproducible for a
# given root filesystem, binary and SOURCE_DATE_EPOCH (default: the last commit's time).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

out="$repo/target/image"
binary=""
relay=""
scheduler=""
tag=""
refresh=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --binary) binary="$2"; shift 2 ;;
    --relay-binary) relay="$2"; shift 2 ;;
    --scheduler-binary) scheduler="$2"; shift 2 ;;
    --tag) tag="$2"; shift 2 ;;
    --refresh) refresh=1; shift ;;
    -h|--help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

for tool in mmdebstrap umoci skopeo; do
  command -v "$tool" >/dev/null || {
    echo "build.sh: $tool is missing: apt-get install mmdebstrap umoci skopeo" >&2
    exit 1
  }
done
[ "$(id -u)" -eq 0 ] || { echo "build.sh: needs root (mmdebstrap --mode=root, layer ownership)" >&2; exit 1; }

version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -1)"
tag="${tag:-$version}"
name="dispy/node"
: "${SOURCE_DATE_EPOCH:=$(git -C "$repo" log -1 --format=%ct 2>/dev/null || echo 1700000000)}"
export SOURCE_DATE_EPOCH
created="$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)"
t0=$(date +%s)

# --- the binary
if [ -z "$binary" ]; then
  echo "== cargo build --release -p dispynode"
  cargo build --release -q -p dispynode --manifest-path "$repo/Cargo.toml"
  binary="$repo/target/release/dispynode"
fi
relay="${relay:-$(dirname "$binary")/dispynetrelay}"
scheduler="${scheduler:-$(dirname "$binary")/dispyscheduler}"
for b in "$binary" "$relay" "$scheduler"; do
  [ -x "$b" ] || { echo "build.sh: no executable at $b" >&2; exit 1; }
done

# --- layer 1: the root filesystem (cached)
# Everything that decides the root filesystem's content is in this list, and so in the key.
suite=bookworm
mirrors=(
  "deb http://deb.debian.org/debian $suite main"
  "deb http://deb.debian.org/debian $suite-updates main"
  "deb http://deb.debian.org/debian-security $suite-security main"
)
# The hooks are single-quoted on purpose: mmdebstrap runs them with "$1" = the new root.
# shellcheck disable=SC2016
mm_args=(
  --mode=root --variant=apt --include=python3
  --aptopt='APT::Install-Recommends "false"'
  --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
  --skip=output/dev
  --dpkgopt='path-exclude=/usr/share/man/*'
  --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-include=/usr/share/doc/*/copyright'
  --dpkgopt='path-exclude=/usr/share/locale/*'
  --dpkgopt='path-exclude=/usr/share/info/*'
  --customize-hook='chroot "$1" groupadd --gid 10001 dispy'
  --customize-hook='chroot "$1" useradd --uid 10001 --gid 10001 --no-log-init --home-dir /var/lib/dispynode --create-home --shell /usr/sbin/nologin dispy'
  --customize-hook='rm -rf "$1"/var/cache/apt/*.bin "$1"/var/lib/apt/lists/* "$1"/var/log/*.log "$1"/var/cache/ldconfig/aux-cache "$1"/var/cache/debconf/*-old "$1"/var/lib/dpkg/*-old'
)
cache="${DISPY_IMAGE_CACHE:-/var/cache/dispy-image}"
key="$( { mmdebstrap --version; printf '%s\n' "$suite" "${mirrors[@]}" "${mm_args[@]}"; } | sha256sum | cut -c1-16)"
rootfs="$cache/rootfs-$suite-$key.tar"
mkdir -p "$cache"
if [ "$refresh" -eq 1 ] || [ ! -s "$rootfs" ]; then
  echo "== mmdebstrap $suite (python3) -> $rootfs"
  # The epoch of the root filesystem is fixed, so its tarball does not change with the commit.
  SOURCE_DATE_EPOCH=1700000000 mmdebstrap --quiet --format=tar "${mm_args[@]}" "$suite" "$rootfs.tmp" "${mirrors[@]}"
  mv "$rootfs.tmp" "$rootfs"
else
  echo "== root filesystem from cache: $rootfs"
fi

# --- layer 2: dispynode, dispynetrelay, dispyscheduler and the health check
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/app/usr/local/bin"
# Debug info stays in the build; the image gets the stripped binary (as in the Dockerfile).
objcopy --strip-debug "$binary" "$work/app/usr/local/bin/dispynode"
objcopy --strip-debug "$relay" "$work/app/usr/local/bin/dispynetrelay"
objcopy --strip-debug "$scheduler" "$work/app/usr/local/bin/dispyscheduler"
install -m 0755 "$here/dispynode-healthcheck" "$work/app/usr/local/bin/dispynode-healthcheck"
chmod 0755 "$work/app/usr/local/bin/dispynode" "$work/app/usr/local/bin/dispynetrelay" \
  "$work/app/usr/local/bin/dispyscheduler"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$SOURCE_DATE_EPOCH" \
  -C "$work/app" -cf "$work/app.tar" usr

# --- the OCI image layout
layout="$out/oci"
rm -rf "$layout"
mkdir -p "$out"
img="$layout:$tag"
umoci init --layout "$layout"
umoci new --image "$img"
umoci raw add-layer --image "$img" --history.created "$created" \
  --history.created_by "mmdebstrap --variant=apt --include=python3 $suite; useradd dispy (10001)" "$rootfs"
umoci raw add-layer --image "$img" --history.created "$created" \
  --history.created_by "COPY dispynode dispynetrelay dispyscheduler dispynode-healthcheck /usr/local/bin/" "$work/app.tar"
# The same user, entrypoint, ports and labels as node-image/Dockerfile. (Docker's HEALTHCHECK
# is no field of the OCI image config; the daemonless image ships the same script, and
# Kubernetes uses its own probes anyway.)
labels=(
  "org.opencontainers.image.title=dispynode"
  "org.opencontainers.image.description=dispy node agent: runs dispy computations and jobs (python3 included)"
  "org.opencontainers.image.version=$version"
  "org.opencontainers.image.licenses=MIT"
  "org.opencontainers.image.base.name=debian:$suite"
)
label_args=()
for l in "${labels[@]}"; do label_args+=(--config.label "$l"); done
umoci config --image "$img" --no-history \
  --os linux --architecture amd64 --created "$created" --author "dispy" \
  --config.user 10001:10001 \
  --config.entrypoint dispynode \
  --config.cmd=--daemon \
  --config.workingdir /var/lib/dispynode \
  --clear=config.env \
  --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --config.env TMPDIR=/tmp \
  --config.exposedports 9701/tcp --config.exposedports 9701/udp \
  --config.stopsignal SIGTERM \
  "${label_args[@]}" \
  --manifest.annotation "org.opencontainers.image.created=$created" \
  --manifest.annotation "org.opencontainers.image.ref.name=$tag"
umoci gc --layout "$layout"

# --- the docker-archive tarball, converted from the layout (same layers, same config)
archive="$out/dispynode-image.tar"
rm -f "$archive"
skopeo --insecure-policy copy --quiet "oci:$layout:$tag" "docker-archive:$archive:$name:$tag"

echo "== built $name:$tag in $(( $(date +%s) - t0 ))s"
echo "oci layout:     $layout ($name:$tag)"
echo "docker-archive: $archive  (docker load -i $archive)"
du -sh "$layout" "$archive" | sed 's/^/size: /'
