#!/bin/sh
# Build a local stand-in for Debian's official image when no container registry can be reached:
#   sh docker/base-image.sh debian:bookworm-slim
# It is a minbase debootstrap of the same release, trimmed like the "-slim" image (no docs, man pages or
# locales, empty apt lists), imported under the name that `docker pull` would give, so the Dockerfiles
# stay unchanged on a connected machine. Needs root, debootstrap and a reachable Debian mirror.
set -eu

IMAGE=${1:-debian:bookworm-slim}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
ROOTFS=$(mktemp -d /tmp/camserve-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT

debootstrap --variant=minbase "$SUITE" "$ROOTFS" "$MIRROR"

# The official images point apt at the release, its updates and the security archive.
rm -f "$ROOTFS/etc/apt/sources.list"
cat > "$ROOTFS/etc/apt/sources.list.d/debian.sources" <<SOURCES
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES

# What "-slim" leaves out: documentation and translations that nothing in a container reads.
cat > "$ROOTFS/etc/dpkg/dpkg.cfg.d/docker-slim" <<'SLIM'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
SLIM
# Keep apt's downloads out of image layers, as the official images do.
cat > "$ROOTFS/etc/apt/apt.conf.d/docker-clean" <<'CLEAN'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CLEAN
find "$ROOTFS/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$ROOTFS/usr/share/man" "$ROOTFS/usr/share/locale" "$ROOTFS/usr/share/info" -mindepth 1 -delete 2>/dev/null || true
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/* "$ROOTFS"/var/log/*.log "$ROOTFS"/tmp/*

tar --numeric-owner -C "$ROOTFS" -c . | docker import -c 'CMD ["bash"]' -m "debootstrap --variant=minbase $SUITE" - "$IMAGE"
docker image ls "$IMAGE"
