# shellcheck shell=bash
# Sourced by scripts/container_test.sh: podman set up for this kind of machine, and a local base image.
#
# No image registry is reachable here, so the base image (Debian bookworm + python3, what the Dockerfile's
# CPU stage `os-cpu` expects of PYTHON_IMAGE: a Debian with `python` and the venv module) is made from
# Debian's packages with debootstrap and `podman import`. Two adjustments make podman run on these machines:
# a containers.conf with `default_ulimits = []` (else runc fails on `setrlimit RLIMIT_NPROC: Operation not
# permitted`) and the runc runtime (crun refuses hybrid cgroups). Both go into a private containers.conf
# (CONTAINERS_CONF): the machine's own /etc/containers is left alone.

CT_BASE_IMAGE=${CT_BASE_IMAGE:-localhost/olora-base:bookworm-python3}
CT_SUITE=${CT_SUITE:-bookworm}

CT_PASSED=0
ct_log() { printf '[container-test %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
ct_pass() { CT_PASSED=$((CT_PASSED + 1)); ct_log "ok: $*"; }
# the plain closing line CI reads: "container-test: N passed, N failed"
ct_die() { ct_log "FAILED: $*"; echo "container-test: $CT_PASSED passed, 1 failed"; exit 1; }

# podman, runc, debootstrap and curl from Debian's packages (as root, once).
ct_install_tools() {
    local need=() tool
    for tool in podman runc debootstrap curl; do
        command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || need+=("$tool")
    done
    [ ${#need[@]} -eq 0 ] && return 0
    [ "$(id -u)" = 0 ] || ct_die "missing ${need[*]}: sudo apt-get install -y ${need[*]} (or run as root)"
    command -v apt-get >/dev/null 2>&1 || ct_die "missing ${need[*]} and no apt-get to install them"
    ct_log "installing ${need[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "${need[@]}" >"$CT_WORK/apt.log" 2>&1 \
        || { apt-get update -qq >>"$CT_WORK/apt.log" 2>&1 \
             && apt-get install -y -qq "${need[@]}" >>"$CT_WORK/apt.log" 2>&1; } \
        || ct_die "apt-get install ${need[*]} (see $CT_WORK/apt.log)"
}

# A private containers.conf; every podman call of the script reads only this one.
ct_podman_config() {
    cat >"$CT_WORK/containers.conf" <<'EOF'
[containers]
default_ulimits = []

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
    export CONTAINERS_CONF="$CT_WORK/containers.conf"
    podman info >/dev/null 2>"$CT_WORK/podman-info.log" || ct_die "podman info (see $CT_WORK/podman-info.log)"
}

# The Debian mirror apt itself uses for the suite (enabled sources only; a disabled one would make
# debootstrap fail), falling back to deb.debian.org.
ct_debian_mirror() {
    local site
    # shellcheck disable=SC2016  # $(SITE) is apt's placeholder, not the shell's
    site=$(apt-get indextargets --format '$(SITE) $(RELEASE)' 2>/dev/null \
           | awk -v suite="$CT_SUITE" '$2 == suite {print $1; exit}')
    echo "${site:-http://deb.debian.org/debian}"
}

# debootstrap a minbase with python3 + venv, strip caches and host files, import it. Skipped when the image
# exists, unless CT_REBUILD_BASE=1.
ct_base_image() {
    if [ "${CT_REBUILD_BASE:-0}" != 1 ] && podman image exists "$CT_BASE_IMAGE"; then
        ct_log "base image $CT_BASE_IMAGE exists (CT_REBUILD_BASE=1 or --rebuild-base makes it anew)"
        return 0
    fi
    local root="$CT_WORK/rootfs" mirror
    mirror=$(ct_debian_mirror)
    ct_log "debootstrap $CT_SUITE minbase from $mirror (a few minutes)"
    debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
        "$CT_SUITE" "$root" "$mirror" >"$CT_WORK/debootstrap.log" 2>&1 \
        || ct_die "debootstrap (see $CT_WORK/debootstrap.log)"
    # What a registry's slim image leaves out too: package caches and lists, logs; and the host's own files
    # debootstrap copied in (podman mounts its own resolv.conf, hosts and hostname at run time).
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/* \
           "$root"/var/log/* "$root"/tmp/* "$root"/root/.cache
    : >"$root/etc/resolv.conf"
    : >"$root/etc/hostname"
    chroot "$root" python -c 'import venv, ensurepip' || ct_die "the base has no python with venv + ensurepip"
    ct_log "importing $CT_BASE_IMAGE"
    tar -C "$root" -c . | podman import --quiet \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$CT_BASE_IMAGE" >/dev/null \
        || ct_die "podman import of the base"
    rm -rf "$root"
}
