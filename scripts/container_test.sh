#!/usr/bin/env bash
# Build the olora-serve image (CPU variant: the same builder and runtime stages as the GPU default, on a
# local Debian base) with podman and run it the way deploy/ runs it, then check it for real:
#
#   non-root user, read-only root filesystem with a writable /tmp tmpfs, all capabilities dropped, the adapter
#   store and the model cache as volumes, keys from the environment; the image's HEALTHCHECK turns healthy;
#   an adapter is uploaded (the demo adapter `shout`, as a .tgz) and generates; /metrics counts it; after a
#   restart the adapter is still served from the volume; the image holds no .git, no test file, no secret.
#
# Usage: scripts/container_test.sh [--cold] [--rebuild-base] [--no-cache]      (also: make container-test)
#   --rebuild-base  debootstrap the base image anew (else an existing localhost base image is reused)
#   --no-cache      build every Dockerfile step anew (no layer cache)
#   --cold          both, and the olora-serve image removed first: what a fresh machine does
# Needs root (apt-get, debootstrap, rootful podman) and the package registries; no image registry.
# Cleans up its container, volumes and temp files; keeps the images as a cache for the next run.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

CT_IMAGE=${CT_IMAGE:-localhost/olora-serve:0.1.0-cpu}
CT_TIMEOUT_S=${CT_TIMEOUT_S:-300}   # the longest wait for healthy (the embedded model loads in seconds)
COLD=0 NO_CACHE=0
for arg in "$@"; do
    case "$arg" in
        --cold) COLD=1 NO_CACHE=1 CT_REBUILD_BASE=1 ;;
        --rebuild-base) CT_REBUILD_BASE=1 ;;
        --no-cache) NO_CACHE=1 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done
export CT_REBUILD_BASE=${CT_REBUILD_BASE:-0}

CT_WORK=$(mktemp -d /var/tmp/olora-container-test.XXXXXX)
NAME=olora-ct-$$
VOL_ADAPTERS=olora-ct-adapters-$$
VOL_HF=olora-ct-hf-$$
# shellcheck source=scripts/container_base.sh
source "$REPO/scripts/container_base.sh"
# shellcheck source=scripts/container_checks.sh
source "$REPO/scripts/container_checks.sh"

OK=0
cleanup() {
    set +e
    if command -v podman >/dev/null 2>&1 && [ -n "${CONTAINERS_CONF:-}" ]; then
        podman rm -f -t 10 "$NAME" >/dev/null 2>&1
        podman volume rm -f "$VOL_ADAPTERS" "$VOL_HF" >/dev/null 2>&1
        podman image unmount "$CT_IMAGE" >/dev/null 2>&1
    fi
    if [ "$OK" = 1 ]; then
        rm -rf "$CT_WORK"
    else
        # keep the logs of a failed run, without the large base rootfs
        rm -rf "$CT_WORK/rootfs"
        ct_log "logs kept in $CT_WORK"
    fi
}
trap cleanup EXIT

declare -a TIMES=()
phase() {  # phase NAME COMMAND...: run it and record its duration
    local name=$1 start=$SECONDS
    shift
    "$@"
    TIMES+=("$(printf '%-22s %5d s' "$name" $((SECONDS - start)))")
}

# The pip settings of this machine: find-links (a folder with the torch CPU wheel) and the CA bundle.
pip_setting() {
    local env_name
    env_name="PIP_$(echo "$1" | tr 'a-z-' 'A-Z_')"
    if [ -n "${!env_name:-}" ]; then echo "${!env_name}"; return; fi
    python3 -m pip config list 2>/dev/null | sed -n "s/^[a-z:]*\.$1='\(.*\)'\$/\1/p" | head -n 1
}

build_image() {
    local torch_pin wheels="" dir ca
    torch_pin=$(grep -o '"torch==[^"]*"' pyproject.toml | tr -d '"')
    for dir in $(pip_setting find-links); do
        if compgen -G "$dir/${torch_pin/==/-}*.whl" >/dev/null; then wheels=$dir; break; fi
    done
    local args=(--format docker --build-arg TORCH_VARIANT=cpu --build-arg "PYTHON_IMAGE=$CT_BASE_IMAGE"
                -t "$CT_IMAGE")
    if [ -n "$wheels" ]; then  # mounted under /tmp: the mount point stays an empty dir, never a layer's file
        ct_log "torch wheel from $wheels (pip's find-links), mounted read-only into the build"
        args+=(--build-arg TORCH_FIND_LINKS=/tmp/torch-wheels -v "$wheels:/tmp/torch-wheels:ro")
    else
        ct_log "no $torch_pin wheel in pip's find-links: the build uses PyTorch's CPU index"
    fi
    # pip inside the build trusts what pip here trusts (a TLS-inspecting proxy's CA); mounted, not copied
    ca=$(pip_setting cert)
    ca=${ca:-/etc/ssl/certs/ca-certificates.crt}
    [ -f "$ca" ] && args+=(-v "$ca:/etc/ssl/certs/ca-certificates.crt:ro")
    [ "$NO_CACHE" = 1 ] && args+=(--no-cache)
    ct_log "building $CT_IMAGE (log: $CT_WORK/build.log)"
    local previous
    previous=$(podman image inspect --format '{{.Id}}' "$CT_IMAGE" 2>/dev/null || true)
    podman build "${args[@]}" . >"$CT_WORK/build.log" 2>&1 \
        || { tail -n 30 "$CT_WORK/build.log" >&2; ct_die "podman build (see $CT_WORK/build.log)"; }
    # the image this build replaced is now untagged: remove it, else every code change leaves ~1.5 GB behind
    if [ -n "$previous" ] && [ "$previous" != "$(podman image inspect --format '{{.Id}}' "$CT_IMAGE")" ]; then
        podman rmi "$previous" >/dev/null 2>&1 || true
    fi
    local torch_version
    torch_version=$(podman run --rm --network none --entrypoint python "$CT_IMAGE" \
                    -c 'import torch; print(torch.__version__)' 2>>"$CT_WORK/podman-run.log")
    [ "$torch_version" = "${torch_pin#torch==}+cpu" ] || ct_die "the image's torch is '$torch_version', not the CPU build"
    ct_pass "built $CT_IMAGE with torch $torch_version"
}

START=$SECONDS
ct_log "work dir $CT_WORK"
phase "install podman etc." ct_install_tools
phase "podman config" ct_podman_config
if [ "$COLD" = 1 ]; then
    podman rmi -f "$CT_IMAGE" "$CT_BASE_IMAGE" >/dev/null 2>&1 || true
fi
phase "base image" ct_base_image
phase "build" build_image
phase "image contents" ct_check_image
phase "run checks" ct_run_checks

SIZE=$(podman image inspect --format '{{.Size}}' "$CT_IMAGE")
BASE_SIZE=$(podman image inspect --format '{{.Size}}' "$CT_BASE_IMAGE")
OK=1
ct_log "PASSED: all container checks"
{
    echo "image $CT_IMAGE: $((SIZE / 1000000)) MB (base $CT_BASE_IMAGE: $((BASE_SIZE / 1000000)) MB)"
    printf '%s\n' "${TIMES[@]}"
    printf '%-22s %5d s\n' "total" $((SECONDS - START))
} >&2
echo "container-test: $CT_PASSED passed, 0 failed"
