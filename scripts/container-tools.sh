#!/usr/bin/env bash
# Build and run seqops images on a machine without a Docker engine (buildah + podman).
#
#   scripts/container-tools.sh tools   install buildah, podman, runc, debootstrap (apt, idempotent)
#   scripts/container-tools.sh base    make the local base image (debootstrap bookworm; skipped if present)
#   scripts/container-tools.sh serve   build the serve image (docker/serve.Dockerfile)
#   scripts/container-tools.sh train   build the train image (docker/train.Dockerfile; big)
#   scripts/container-tools.sh all     tools + base + serve (the default)
#   scripts/container-tools.sh run-flags   print the `podman run` flags that work here
#
# Why a local base: no image registry is reachable here, so the base image is a Debian root
# made with debootstrap from the same mirror apt uses, imported into podman's storage. Its
# python3 is 3.11, the same as `python:3.11-slim-bookworm`, the Dockerfiles' default base.
# Every step skips work already done, so CI can call this on a fresh or a reused machine.
#
# Environment (all optional):
#   SEQOPS_BASE_IMAGE   base image to make/use        (localhost/seqops-base:bookworm)
#   SEQOPS_SERVE_IMAGE  tag of the serve image        (localhost/seqops-serve:dev)
#   SEQOPS_TRAIN_IMAGE  tag of the train image        (localhost/seqops-train:dev)
#   DEBIAN_MIRROR       mirror for debootstrap        (the one in /etc/apt/sources.list*)
#   DEBIAN_SECURITY_MIRROR  its security updates      (likewise)
#   DEBIAN_SUITE        suite for debootstrap         (bookworm)
#   PIP_CERT            CA bundle pip needs to reach PyPI; passed to builds as a secret
#   FORCE_BASE=1        remake the base image even if it exists
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BASE_IMAGE="${SEQOPS_BASE_IMAGE:-localhost/seqops-base:bookworm}"
SERVE_IMAGE="${SEQOPS_SERVE_IMAGE:-localhost/seqops-serve:dev}"
TRAIN_IMAGE="${SEQOPS_TRAIN_IMAGE:-localhost/seqops-train:dev}"
SUITE="${DEBIAN_SUITE:-bookworm}"
# runc, not crun: it is what works in this kind of VM (cgroup v1); the ulimits keep podman
# from copying the host's huge nofile/nproc limits, which runc rejects here.
RUN_FLAGS=(--runtime runc --ulimit nofile=4096:4096 --ulimit nproc=4096:4096)
TOOLS=(buildah podman runc debootstrap)

log() { printf '[container-tools %4ss] %s\n' "$SECONDS" "$*" >&2; }
die() {
    printf '[container-tools] error: %s\n' "$*" >&2
    exit 1
}

require_root() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (rootful buildah/podman, debootstrap); try sudo $0 $*"
}

install_tools() {
    local missing=() tool
    for tool in "${TOOLS[@]}"; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        log "tools present: ${TOOLS[*]}"
        return
    fi
    command -v apt-get >/dev/null || die "apt-get not found; install ${missing[*]} by hand"
    log "installing ${missing[*]} (and their helpers) with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # uidmap/slirp4netns/fuse-overlayfs are podman's usual companions; cheap, and make
    # the same script work for rootless use on a developer machine.
    DEBCONF_NOWARNINGS=yes apt-get install -y -qq --no-install-recommends \
        buildah podman runc debootstrap debian-archive-keyring ca-certificates \
        uidmap slirp4netns fuse-overlayfs containernetworking-plugins catatonit iptables \
        >/dev/null
}

# The first http(s) URI apt uses for suite $1 (deb822 *.sources or one-line lists), else $2.
detect_mirror() {
    local suite="$1" fallback="$2" f
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        awk -v suite="$suite" '
            /^URIs:/ { uri = $2 }
            /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) hit = 1 }
            /^$/ { if (hit && uri != "") { print uri; exit } hit = 0; uri = "" }
            END { if (hit && uri != "") print uri }' "$f"
    done | head -n1 | grep . && return
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $f ]] || continue
        awk -v suite="$suite" '$1 == "deb" && $0 ~ (" " suite " ") { for (i = 2; i <= NF; i++)
            if ($i ~ /^https?:/) { print $i; exit } }' "$f"
    done | head -n1 | grep . && return
    echo "$fallback"
}

make_base() {
    if podman image exists "$BASE_IMAGE" && [[ ${FORCE_BASE:-0} != 1 ]]; then
        log "base image $BASE_IMAGE exists (FORCE_BASE=1 remakes it)"
        return
    fi
    # Two builders at once (a test and `make images`) must not both debootstrap.
    exec 9>/var/lock/seqops-base-image.lock
    flock 9
    if podman image exists "$BASE_IMAGE" && [[ ${FORCE_BASE:-0} != 1 ]]; then
        log "base image $BASE_IMAGE made meanwhile"
        return
    fi
    local mirror security rootfs
    mirror="${DEBIAN_MIRROR:-$(detect_mirror "$SUITE" http://deb.debian.org/debian)}"
    security="${DEBIAN_SECURITY_MIRROR:-$(detect_mirror "$SUITE-security" "${mirror%/debian}/debian-security")}"
    rootfs="$(mktemp -d /var/tmp/seqops-rootfs.XXXXXX)"
    # shellcheck disable=SC2064  # expand now: the trap must clean this very directory
    trap "umount -l '$rootfs/proc' 2>/dev/null || true; rm -rf '$rootfs' '$rootfs.log'" EXIT
    log "debootstrap $SUITE from $mirror into $rootfs"
    # minbase: only Priority required + apt; python3-venv brings ensurepip, so every venv
    # made in the images gets pip without Debian's own (PEP 668-managed) pip.
    # Downloaded .debs are kept, so remaking the base (FORCE_BASE=1) does not fetch them again.
    mkdir -p /var/cache/seqops-debootstrap
    debootstrap --variant=minbase --components=main --cache-dir=/var/cache/seqops-debootstrap \
        --include=python3,python3-venv,ca-certificates \
        "$SUITE" "$rootfs" "$mirror" >/dev/null
    cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    rm -f "$rootfs/etc/apt/sources.list"
    # Slim like the official *-slim images: no docs, man pages or translations, no recommends.
    cat >"$rootfs/etc/dpkg/dpkg.cfg.d/01-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF
    echo 'APT::Install-Recommends "false"; APT::Install-Suggests "false";' \
        >"$rootfs/etc/apt/apt.conf.d/01-norecommends"
    log "applying $SUITE-updates and security updates"
    mount -t proc proc "$rootfs/proc"
    # Quiet unless it fails: the log of a failed upgrade is what one needs to see.
    if ! chroot "$rootfs" /bin/sh -c 'export DEBIAN_FRONTEND=noninteractive;
        apt-get update -qq && apt-get -y -qq upgrade && apt-get clean' >"$rootfs.log" 2>&1; then
        cat "$rootfs.log" >&2
        die "apt-get upgrade in the new root failed (log above)"
    fi
    rm -f "$rootfs.log"
    umount -l "$rootfs/proc"
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
        "$rootfs"/var/log/*.log "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
        "$rootfs"/usr/share/locale/*
    find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    log "importing $BASE_IMAGE"
    tar --numeric-owner --xattrs -C "$rootfs" -c . |
        podman import \
            --change 'ENV LANG=C.UTF-8' \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'CMD ["python3"]' \
            --message "debootstrap $SUITE minbase + python3, python3-venv, ca-certificates" \
            - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
    log "made $BASE_IMAGE ($(podman image inspect --format '{{.Size}}' "$BASE_IMAGE") bytes)"
}

# Build flags shared by both images. The CA bundle goes in as a build secret: pip sees it
# at /run/secrets/pip_cert during the RUN, and it never lands in a layer.
build_flags() {
    local cert="${PIP_CERT:-}"
    BUILD_FLAGS=(--isolation chroot --layers --force-rm --format docker --build-arg "BASE_IMAGE=$BASE_IMAGE")
    if [[ -z $cert ]]; then
        cert="$(python3 -m pip config get global.cert 2>/dev/null || true)"
    fi
    if [[ -n $cert && -f $cert ]]; then
        BUILD_FLAGS+=(--secret "id=pip_cert,src=$cert")
    fi
}

build_serve() {
    build_flags
    log "building $SERVE_IMAGE from docker/serve.Dockerfile"
    buildah bud "${BUILD_FLAGS[@]}" -f "$ROOT/docker/serve.Dockerfile" -t "$SERVE_IMAGE" \
        "$@" "$ROOT"
}

build_train() {
    build_flags
    # This machine keeps the CPU torch wheel in /opt/wheels: mount it (read-only, build time
    # only) so `torch==2.13.0` does not pull several GB of CUDA wheels. GPU hosts leave it out.
    local wheels="${PIP_FIND_LINKS:-$(python3 -m pip config get global.find-links 2>/dev/null || true)}"
    wheels="${wheels%% *}" # the first entry, if pip lists several
    if [[ -n $wheels && -d $wheels ]]; then
        BUILD_FLAGS+=(--volume "$wheels:/opt/host-wheels:ro" --build-arg "PIP_FIND_LINKS=/opt/host-wheels")
    fi
    log "building $TRAIN_IMAGE from docker/train.Dockerfile"
    buildah bud "${BUILD_FLAGS[@]}" -f "$ROOT/docker/train.Dockerfile" -t "$TRAIN_IMAGE" \
        "$@" "$ROOT"
}

main() {
    local cmd="${1:-all}"
    [[ $# -gt 0 ]] && shift
    # One step per line, never `a && b`: errexit does not apply inside a function run as the
    # left side of &&, so a failing debootstrap would go unnoticed.
    case "$cmd" in
    tools | base | serve | train | all)
        require_root "$cmd"
        install_tools
        [[ $cmd == tools ]] && return
        make_base
        case "$cmd" in
        serve | all) build_serve "$@" ;;
        train) build_train "$@" ;;
        esac
        ;;
    run-flags) echo "${RUN_FLAGS[*]}" ;;
    -h | --help | help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//' ;;
    *) die "unknown command '$cmd' (tools|base|serve|train|all|run-flags)" ;;
    esac
}

main "$@"
