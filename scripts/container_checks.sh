# shellcheck shell=bash
# Sourced by scripts/container_test.sh: what the image must (not) contain, and the run checks.
# Uses CT_IMAGE, CT_WORK, NAME, VOL_ADAPTERS, VOL_HF, CT_TIMEOUT_S, REPO and ct_log/ct_die.

# Clean shutdowns in the container's log so far (uvicorn's line once the lifespan's shutdown, engine included,
# has finished). The log is conmon's k8s-file (podman run --log-driver k8s-file): written before podman records
# the exit, so it is complete when `podman stop` returns (journald may still be flushing then).
ct_shutdowns() {
    local log
    log=$(podman logs "$NAME" 2>&1)
    grep -c "Application shutdown complete" <<<"$log" || true
}

# ---- the image's contents --------------------------------------------------------------------------------
ct_check_image() {
    local root problems="$CT_WORK/image-problems.txt" user
    : >"$problems"
    user=$(podman image inspect --format '{{.Config.User}}' "$CT_IMAGE")
    [[ "$user" =~ ^[1-9][0-9]*(:[0-9]+)?$ ]] || echo "USER is '$user', not a numeric non-root user" >>"$problems"
    # (grep -q on a variable, not on a pipe: under pipefail a writer cut off by grep -q's early exit (SIGPIPE)
    # fails the pipeline although the line was found, depending on timing)
    local healthcheck
    healthcheck=$(podman image inspect --format '{{json .Config.Healthcheck}}' "$CT_IMAGE")
    grep -q '/health' <<<"$healthcheck" \
        || echo "no HEALTHCHECK on /health in the image config (build with --format docker)" >>"$problems"
    # no secret in the image's environment, build arguments or history
    podman image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$CT_IMAGE" \
        | grep -iE '^[A-Z_]*(KEY|TOKEN|SECRET|PASSWORD)S?=' | sed 's/^/secret-like ENV: /' >>"$problems" || true
    podman history --no-trunc --format '{{.CreatedBy}}' "$CT_IMAGE" \
        | grep -ioE '[A-Z_]*(KEY|TOKEN|SECRET|PASSWORD)S?=[^ ]*' | sed 's/^/secret-like build setting: /' \
        >>"$problems" || true

    root=$(podman image mount "$CT_IMAGE")
    # no repository metadata, no local secrets, no build inputs (wheels, the builder's source tree)
    # (Debian's python3-venv ships the wheels ensurepip installs in /usr/share/python-wheels)
    find "$root" -xdev \( -name .git -o -name .env -o -name '*.env' -o -name .venv -o -name 'id_rsa*' \
                         -o -name '*.key' -o \( -name '*.whl' -not -path "$root/usr/share/python-wheels/*" \) \) \
        -printf 'in the image: /%P\n' >>"$problems"
    [ -e "$root/src" ] && echo "in the image: /src (the builder's source tree)" >>"$problems"
    # (allowed: botocore's API documentation examples, botocore/data/<service>/<version>/examples-1.json: IAM's
    # UploadServerCertificate example shows a placeholder PEM block; nothing else under botocore is let through)
    grep -rlI -e '-----BEGIN [A-Z ]*PRIVATE KEY-----' "$root"/{opt,home,data,etc,root,srv} 2>/dev/null \
        | grep -vE "^$root/opt/venv/lib/python3\.[0-9]+/site-packages/botocore/data/[a-z0-9-]+/[0-9-]+/examples-1\.json$" \
        | sed "s|^$root|private key in: |" >>"$problems" || true
    # no file of the repo's tests/ (same content under any path), no tests/ beside the installed packages
    local names=() f
    for f in "$REPO"/tests/*; do [ -f "$f" ] && names+=(-o -name "$(basename "$f")"); done
    local test_sums
    test_sums=$(sha256sum "$REPO"/tests/* 2>/dev/null || true)
    find "$root" -xdev -type f \( "${names[@]:1}" \) -print0 | xargs -0 -r sha256sum | while read -r sum path; do
        if grep -q "^$sum " <<<"$test_sums"; then
            echo "test file in the image: ${path#"$root"}"
        fi
    done >>"$problems"
    find "$root/opt/venv/lib" -path '*/site-packages/tests' -printf 'in the image: /%P\n' >>"$problems"
    podman image unmount "$CT_IMAGE" >/dev/null

    if [ -s "$problems" ]; then cat "$problems" >&2; ct_die "the image holds what it must not"; fi
    ct_pass "image: user $user, HEALTHCHECK on /health, no .git / test file / secret / build input"
}

# ---- running it ------------------------------------------------------------------------------------------
ct_random_key() { od -An -tx1 -N24 /dev/urandom | tr -d ' \n'; }
ct_free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
ct_json() { python3 -c 'import json, sys; v = json.load(sys.stdin)
for k in sys.argv[1:]: v = v[int(k) if isinstance(v, list) else k]
print(v)' "$@"; }

# curl to CT_PATH; prints the status code, the body goes to $CT_WORK/body.
ct_http() {
    curl -sS -m 120 -o "$CT_WORK/body" -w '%{http_code}' "$@" "http://127.0.0.1:$PORT${CT_PATH}" || true
}
ct_expect() {  # ct_expect STATUS WHAT -- CURL ARGS (CT_PATH set)
    local want=$1 what=$2 got
    shift 3
    got=$(ct_http "$@")
    [ "$got" = "$want" ] || { cat "$CT_WORK/body" >&2; echo >&2; ct_die "$what: HTTP $got, expected $want"; }
}

ct_wait_healthy() {  # the image's HEALTHCHECK, run by podman (no systemd here to schedule it)
    local deadline=$((SECONDS + CT_TIMEOUT_S)) start=$SECONDS health
    while [ $SECONDS -lt $deadline ]; do
        [ "$(podman inspect --format '{{.State.Status}}' "$NAME")" = running ] \
            || { podman logs "$NAME" 2>&1 | tail -n 30 >&2; ct_die "the container stopped while starting"; }
        podman healthcheck run "$NAME" >/dev/null 2>>"$CT_WORK/healthcheck.log" || true
        health=$(podman inspect --format '{{.State.Health.Status}}' "$NAME")
        if [ "$health" = healthy ]; then ct_pass "HEALTHCHECK healthy after $((SECONDS - start)) s"; return 0; fi
        sleep 2
    done
    podman logs "$NAME" 2>&1 | tail -n 30 >&2
    ct_die "not healthy after ${CT_TIMEOUT_S} s (health: $health)"
}

ct_wait_ready() {  # /ready turns 200 once the model is loaded and the self-check passed (the startup probe)
    local deadline=$((SECONDS + CT_TIMEOUT_S)) start=$SECONDS got
    while [ $SECONDS -lt $deadline ]; do
        [ "$(podman inspect --format '{{.State.Status}}' "$NAME")" = running ] \
            || { podman logs "$NAME" 2>&1 | tail -n 30 >&2; ct_die "the container stopped while loading"; }
        got=$(CT_PATH=/ready ct_http)
        if [ "$got" = 200 ]; then ct_pass "/ready (the Kubernetes readiness probe) 200 after $((SECONDS - start)) s"; return 0; fi
        [ "$got" = 503 ] || { cat "$CT_WORK/body" >&2; ct_die "/ready while loading: HTTP $got, expected 503 or 200"; }
        sleep 1
    done
    cat "$CT_WORK/body" >&2
    ct_die "/ready not 200 after ${CT_TIMEOUT_S} s"
}

ct_generate() {  # ct_generate ADAPTER_ID|"" -> greedy text of the shout prompt
    local adapter=null
    [ -n "$1" ] && adapter="\"$1\""
    CT_PATH=/generate ct_expect 200 "generate (adapter ${1:-none})" -- \
        -H "Authorization: Bearer $OLORA_API_KEYS" -H 'content-type: application/json' \
        -d "{\"inputs\": \"text: Return the list of items.\\nshout:\", \"parameters\":
             {\"adapter_id\": $adapter, \"max_new_tokens\": 12, \"do_sample\": false}}"
    ct_json generated_text <"$CT_WORK/body"
}

ct_run_checks() {
    # keys only come from the environment: without them the server refuses to listen on 0.0.0.0
    local refused
    refused=$(podman run --rm --network none --read-only "$CT_IMAGE" 2>&1) \
        && ct_die "the image started without keys on 0.0.0.0"
    grep -q "no API keys configured" <<<"$refused" || { echo "$refused" >&2; ct_die "no reason given without keys"; }
    ct_pass "without keys the container refuses to bind 0.0.0.0 and says why"

    PORT=$(ct_free_port)
    OLORA_API_KEYS=$(ct_random_key) OLORA_ADMIN_KEYS=$(ct_random_key)
    export OLORA_API_KEYS OLORA_ADMIN_KEYS   # handed to the container by name: never on a command line
    podman volume create "$VOL_ADAPTERS" >/dev/null
    podman volume create "$VOL_HF" >/dev/null
    # as deploy/k8s/deployment.yaml runs it: the image's user, read-only root, only /tmp writable (tmpfs),
    # no capabilities, no privilege escalation, store + model cache as volumes, keys from the environment.
    podman run -d --name "$NAME" --log-driver k8s-file --read-only --read-only-tmpfs=false \
        --tmpfs /tmp:rw,nosuid,nodev,size=1g,mode=1777 --cap-drop ALL --security-opt no-new-privileges \
        -v "$VOL_ADAPTERS:/data/adapters" -v "$VOL_HF:/data/hf-cache" \
        -e OLORA_API_KEYS -e OLORA_ADMIN_KEYS -e OLORA_DEMO_ADAPTERS=false \
        -p "127.0.0.1:$PORT:8000" "$CT_IMAGE" >/dev/null 2>>"$CT_WORK/podman-run.log" \
        || ct_die "podman run (see $CT_WORK/podman-run.log)"
    ct_log "started $NAME on 127.0.0.1:$PORT"
    ct_wait_healthy  # /health answers 200 while the model loads (the port is bound at once)
    ct_wait_ready

    local uid
    uid=$(podman exec "$NAME" id -u)
    [ "$uid" != 0 ] || ct_die "the server runs as root"
    [ "$(podman inspect --format '{{.HostConfig.ReadonlyRootfs}}' "$NAME")" = true ] || ct_die "root fs writable"
    podman exec "$NAME" sh -c 'touch /opt/venv/x 2>/dev/null || touch /home/olora/x 2>/dev/null' \
        && ct_die "the root filesystem is writable"
    podman exec "$NAME" sh -c 'touch /tmp/x && test -w /data/adapters && test -w /data/hf-cache' \
        || ct_die "/tmp or a volume is not writable by uid $uid"
    ct_pass "runs as uid $uid, read-only root, /tmp and the volumes writable"

    tar -czf "$CT_WORK/shout.tgz" -C "$REPO/app/adapters/demo_adapters" shout
    CT_PATH=/adapters ct_expect 401 "upload without a key" -- -F adapter_id=ct-shout -F "archive=@$CT_WORK/shout.tgz"
    CT_PATH=/adapters ct_expect 403 "upload with a generation key" -- -H "Authorization: Bearer $OLORA_API_KEYS" \
        -F adapter_id=ct-shout -F "archive=@$CT_WORK/shout.tgz"
    CT_PATH=/adapters ct_expect 201 "upload" -- -H "Authorization: Bearer $OLORA_ADMIN_KEYS" \
        -F adapter_id=ct-shout -F "archive=@$CT_WORK/shout.tgz"
    local sha
    sha=$(ct_json sha256 <"$CT_WORK/body")
    [ "$(ct_json servable <"$CT_WORK/body")" = True ] || ct_die "the uploaded adapter is not servable"

    local base_text shout_text
    base_text=$(ct_generate "")
    shout_text=$(ct_generate ct-shout)
    [ "$shout_text" != "$base_text" ] || ct_die "the adapter changes nothing"
    # the demo adapter learnt to shout: its letters are upper case
    python3 -c 'import sys; t = [c for c in sys.argv[1] if c.isalpha()]
sys.exit(not t or sum(c.isupper() for c in t) < 0.8 * len(t))' "$shout_text" \
        || ct_die "the shout adapter's output is not upper case: '$shout_text'"
    ct_pass "uploaded ct-shout (401 without key, 403 generation key, 201 admin key); greedy base: \
'${base_text//$'\n'/\\n}', with ct-shout: '${shout_text//$'\n'/\\n}' (differs, upper case)"

    CT_PATH=/metrics ct_expect 200 "/metrics (no key)" --
    grep -qE '^olora_requests_total\{route="/generate",status="200"\} [2-9]' "$CT_WORK/body" \
        || ct_die "/metrics does not count the two generations"
    grep -qE '^olora_adapter_requests_total\{[^}]*"ct-shout"[^}]*\} [1-9]' "$CT_WORK/body" \
        || ct_die "/metrics has no request of adapter ct-shout"
    grep -qE '^olora_generated_tokens_total [1-9]' "$CT_WORK/body" || ct_die "/metrics counts no tokens"
    ct_pass "/metrics counts the generations, the adapter's requests and the tokens"

    # Each stop must be seen to shut down cleanly on its own: the log keeps the lines of earlier runs, so the
    # shutdown lines are counted (grep -c reads the whole log: no SIGPIPE race under pipefail, unlike grep -q on a
    # pipe, which made this check fail or pass by timing once the restart had put a first line in the log).
    [ "$(ct_shutdowns)" = 0 ] || ct_die "a shutdown line before any stop"
    podman restart -t 30 "$NAME" >/dev/null 2>>"$CT_WORK/podman-run.log" || ct_die "podman restart"
    [ "$(ct_shutdowns)" = 1 ] || ct_die "no clean shutdown on restart"
    ct_wait_healthy
    ct_wait_ready
    CT_PATH=/adapters/ct-shout ct_expect 200 "the adapter after the restart" -- \
        -H "Authorization: Bearer $OLORA_API_KEYS"
    [ "$(ct_json sha256 <"$CT_WORK/body")" = "$sha" ] || ct_die "the adapter changed over the restart"
    local again
    again=$(ct_generate ct-shout)
    [ "$again" = "$shout_text" ] || ct_die "after the restart the adapter generates '$again'"
    ct_pass "after the restart ct-shout is served from the volume (same sha256, same greedy text)"

    podman stop -t 30 "$NAME" >/dev/null 2>>"$CT_WORK/podman-run.log" || ct_die "podman stop"
    [ "$(ct_shutdowns)" = 2 ] || ct_die "no clean shutdown on stop"
    ct_pass "stopped cleanly"
}
