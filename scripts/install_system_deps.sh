#!/usr/bin/env bash
# System packages the test suite needs besides Python: nginx (tests/test_replicas.py runs a real nginx in front
# of two replicas; tests/test_deploy_validation.py runs `nginx -t`) and promtool (Debian's `prometheus`
# package: `promtool check config|rules` and `promtool test rules` on deploy/compose/prometheus/).
#
# Idempotent and quiet: does nothing when the binaries are present. Installs with apt-get only as root.
# Never fails the build: when it cannot install, it says why and exits 0, and the tests that need the
# binary then fail with an explanation (they are not skipped).
set -u

need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v promtool >/dev/null 2>&1 || [ -x /usr/bin/promtool ] || need+=(prometheus)
[ ${#need[@]} -eq 0 ] && exit 0

say() { echo "install_system_deps: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
    say "missing ${need[*]} and not root: install them with 'sudo apt-get install -y --no-install-recommends ${need[*]}' (the deploy and replica tests fail without them)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    say "missing ${need[*]} and no apt-get here: install nginx and promtool by other means (the deploy and replica tests fail without them)"
    exit 0
fi

# Package installs must not start services here (prometheus's postinst would start a server on :9090).
# Debian's policy-rc.d convention: exit 101 = "do not start". Only added when none exists, removed after.
policy=/usr/sbin/policy-rc.d
added_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && added_policy=1
fi

say "installing ${need[*]} with apt-get (once)"
export DEBIAN_FRONTEND=noninteractive
ok=0
# An up-to-date package list is needed on a fresh machine; try the install first to stay fast when it is.
if apt-get install -y -qq --no-install-recommends "${need[@]}" >/tmp/install_system_deps.log 2>&1; then
    ok=1
elif apt-get update -qq >>/tmp/install_system_deps.log 2>&1 \
        && apt-get install -y -qq --no-install-recommends "${need[@]}" >>/tmp/install_system_deps.log 2>&1; then
    ok=1
fi
[ "$added_policy" = 1 ] && rm -f "$policy"

if [ "$ok" = 1 ]; then
    # Belt and braces: a package whose service was started anyway (no policy honoured) is stopped again.
    if [[ " ${need[*]} " == *" prometheus "* ]] && command -v service >/dev/null 2>&1; then
        service prometheus stop >/dev/null 2>&1 || true
    fi
    say "installed ${need[*]}"
else
    say "could not install ${need[*]} (see /tmp/install_system_deps.log); the deploy and replica tests fail without them"
fi
exit 0
