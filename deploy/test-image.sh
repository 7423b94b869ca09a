#!/usr/bin/env bash
# The CPU image for real, with podman (hosts without Docker; no container registry needed):
#   1. a base image from a debootstrap'ed Debian bookworm (Python 3.11, as the Dockerfile's base),
#   2. deploy/Dockerfile.cpu built on it (`podman build --from`), pip set up by deploy/podman/pip.conf,
#   3. the container run: /health, the image's HEALTHCHECK, a completion, a chat with a mixture,
#      SIGTERM during a stream (the stream ends cleanly, the container exits 0),
#   4. docker-compose.yml's `cpu` profile through podman-compose: up, healthy, requests, stop, down,
#   5. everything it made removed (POLICYMIX_PODMAN_KEEP=1 keeps the base, image and store for reruns).
# 5 to 9 minutes on 2 cores; 9 when shared (base 1.5, build 3, first start 1.5, drain 0.5, compose 2, cleanup 1).
# Exit 0: passed. Exit 77: skipped, with the reason on the last line ("SKIP: ..."). Else: failed.
#
# podman's settings come from deploy/podman/ through CONTAINERS_CONF, CONTAINERS_REGISTRIES_CONF and
# CONTAINERS_STORAGE_CONF; nothing is written into /etc. Variables: POLICYMIX_TORCH_WHEELS (a folder
# with the local torch CPU wheel; default PIP_FIND_LINKS, else /opt/wheels), POLICYMIX_PIP_CA
# (CA bundle for pip; default PIP_CERT, SSL_CERT_FILE or Debian's), POLICYMIX_PIP_CONF,
# DEBIAN_MIRROR, PYTHON (runs deploy/podman/smoke.py), PODMAN_COMPOSE, POLICYMIX_PODMAN_KEEP.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
CONF=$REPO/deploy/podman
WORK=/var/tmp/policymix-podman  # also named in storage.conf and containers.conf
BASE=localhost/policymix-base:bookworm
IMAGE=localhost/policymix:cpu   # the name docker-compose.yml gives the cpu service's image
NAME=policymix-test-cpu
PYTHON=${PYTHON:-python3}
PODMAN_COMPOSE=${PODMAN_COMPOSE:-podman-compose}
export CONTAINERS_CONF=$CONF/containers.conf
export CONTAINERS_REGISTRIES_CONF=$CONF/registries.conf
export CONTAINERS_STORAGE_CONF=$CONF/storage.conf

T0=$SECONDS
skip() { echo "SKIP: $*"; exit 77; }
log() { printf '[%4ds] %s\n' $((SECONDS - T0)) "$*"; }
elapsed() { echo $((SECONDS - $1)); }

# --- can podman run here? -------------------------------------------------------------------------
[ "$(uname -s)" = Linux ] || skip "podman containers need Linux (this is $(uname -s))"
missing=()
for tool in podman runc debootstrap; do command -v $tool >/dev/null || missing+=($tool); done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        skip "${missing[*]} not installed, and installing needs root and apt-get (Debian): apt-get install podman runc debootstrap"
    fi
    log "installing ${missing[*]} (Debian packages)"
    export DEBIAN_FRONTEND=noninteractive
    apt_get() { apt-get -q -o DPkg::Lock::Timeout=600 "$@"; }
    { apt_get update && apt_get install -y podman runc debootstrap; } >"${TMPDIR:-/tmp}/policymix-apt.log" 2>&1 \
        || skip "apt-get install podman runc debootstrap failed: $(tail -n 3 "${TMPDIR:-/tmp}/policymix-apt.log" | tr '\n' ' ')"
fi
[ "$(id -u)" -eq 0 ] || skip "the image test runs rootful podman (storage in $WORK) and needs root"
command -v "$PODMAN_COMPOSE" >/dev/null || skip "podman-compose not found (pip install podman-compose==1.6.0)"
info=$(podman info --format '{{.Host.OCIRuntime.Name}} {{.Store.GraphDriverName}}' 2>&1) \
    || skip "podman cannot run here: $info"
log "podman $(podman version --format '{{.Client.Version}}'), runtime and storage: $info"

# pip inside the build: the repo's pip.conf, the host's CA bundle, the local torch CPU wheel.
PIP_CONF=${POLICYMIX_PIP_CONF:-$CONF/pip.conf}
CA=${POLICYMIX_PIP_CA:-${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}}
WHEELS=${POLICYMIX_TORCH_WHEELS:-${PIP_FIND_LINKS:-/opt/wheels}}
mounts=(-v "$PIP_CONF:/etc/pip.conf:ro" -v "$CA:/etc/ssl/certs/ca-certificates.crt:ro")
if compgen -G "$WHEELS/torch-2.13.0+cpu-*.whl" >/dev/null; then
    mounts+=(-v "$WHEELS:/mnt:ro")
else
    log "no torch-2.13.0+cpu wheel in $WHEELS: pip looks for it on the image's extra index"
fi

# One run at a time on a host: the store, the names and the compose project are shared.
exec 9>"$WORK.lock"
flock -w 1800 9 || { echo "FAIL: another deploy/test-image.sh held $WORK.lock for 30 minutes"; exit 1; }

cleanup() {
    local rc=$?
    podman rm -f -t 0 "$NAME" >/dev/null 2>&1 || true
    (cd "$REPO" && "$PODMAN_COMPOSE" --profile cpu down -v -t 0 >/dev/null 2>&1) || true
    if [ "${POLICYMIX_PODMAN_KEEP:-0}" != 1 ]; then
        podman system reset -f >/dev/null 2>&1 || true  # only this test's store (storage.conf)
        rm -rf "$WORK" "$WORK.lock"
        log "removed the containers, images, volumes, networks and $WORK"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 143' TERM INT  # so that a killed run still cleans up
mkdir -p "$WORK"

wait_health() {  # URL SECONDS: poll /health until 200
    local url=$1 limit=$2 start=$SECONDS
    until curl -fsS -o /dev/null "$url/health" 2>/dev/null; do
        [ $((SECONDS - start)) -lt "$limit" ] || { echo "FAIL: $url/health not 200 after ${limit}s"; return 1; }
        sleep 2
    done
}
free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# --- 1. base image ----------------------------------------------------------------------------------
t=$SECONDS
if ! podman image exists "$BASE"; then
    rootfs=$WORK/rootfs
    rm -rf "$rootfs"
    log "debootstrap bookworm (python3, python3-venv, ca-certificates) into $rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
        bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -n 20 "$WORK/debootstrap.log"; exit 1; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' - "$BASE" >"$WORK/import.log" 2>&1 || { cat "$WORK/import.log"; exit 1; }
    rm -rf "$rootfs"
fi
T_BASE=$(elapsed $t)
log "base image $BASE ready (${T_BASE}s)"

# --- 2. build ---------------------------------------------------------------------------------------
# --from replaces the Dockerfile's FROM (python:3.11-slim, from a registry) with the local base;
# --format docker keeps HEALTHCHECK (the OCI format drops it).
t=$SECONDS
log "podman build -f deploy/Dockerfile.cpu --from $BASE (log: $WORK/build.log)"
podman build --from "$BASE" --pull=never --format docker "${mounts[@]}" \
    -f "$REPO/deploy/Dockerfile.cpu" -t "$IMAGE" "$REPO" >"$WORK/build.log" 2>&1 \
    || { tail -n 40 "$WORK/build.log"; exit 1; }
T_BUILD=$(elapsed $t)
log "built $IMAGE in ${T_BUILD}s: $(podman image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "%.0f MB", $1/1e6}')"
health=$(podman image inspect "$IMAGE" --format '{{.HealthCheck.Test}}')
case $health in *"/health"*) ;; *) echo "FAIL: the image lost its HEALTHCHECK: '$health'"; exit 1;; esac
leaked=$(podman run --rm --entrypoint sh "$IMAGE" -c 'cat /etc/pip.conf 2>/dev/null; ls -A /mnt' 2>/dev/null)
[ -z "$leaked" ] || { echo "FAIL: the build's pip settings were left in the image: $leaked"; exit 1; }

# --- 3. run -----------------------------------------------------------------------------------------
PORT=$(free_port)
URL=http://127.0.0.1:$PORT
t=$SECONDS
# Without systemd, podman logs that it cannot start health-check timers (run.log); the test runs
# the image's check itself with `podman healthcheck run`.
podman run -d --name "$NAME" -p "127.0.0.1:$PORT:8000" "$IMAGE" >/dev/null 2>"$WORK/run.log" \
    || { cat "$WORK/run.log"; exit 1; }
wait_health "$URL" 600 || { podman logs --tail 30 "$NAME"; exit 1; }
T_HEALTH=$(elapsed $t)
log "/health 200 after ${T_HEALTH}s (the first start converts the embedded GGUF)"
podman healthcheck run "$NAME" >/dev/null || { echo "FAIL: the image's HEALTHCHECK says unhealthy"; exit 1; }
log "the image's HEALTHCHECK: $(podman inspect "$NAME" --format '{{.State.Health.Status}}')"
"$PYTHON" "$CONF/smoke.py" requests "$URL"
"$PYTHON" "$CONF/smoke.py" drain "$URL" podman kill --signal TERM "$NAME"
code=$(podman wait "$NAME")
[ "$code" = 0 ] || { podman logs --tail 30 "$NAME"; echo "FAIL: exit status $code after SIGTERM"; exit 1; }
log "the container drained and exited 0"
podman rm "$NAME" >/dev/null 2>&1

# --- 4. docker-compose.yml, profile cpu, through podman-compose -----------------------------------
# The image is already built under the name compose gives it, so `up` builds nothing.
PORT=$(free_port)
URL=http://127.0.0.1:$PORT
t=$SECONDS
(cd "$REPO" && POLICYMIX_PORT=$PORT "$PODMAN_COMPOSE" --profile cpu up -d --no-build) >"$WORK/compose.log" 2>&1 \
    || { cat "$WORK/compose.log"; exit 1; }
ctr=$(podman ps -q --filter label=io.podman.compose.project=policymix --filter label=com.docker.compose.service=cpu)
[ -n "$ctr" ] || { cat "$WORK/compose.log"; echo "FAIL: podman-compose started no cpu container"; exit 1; }
wait_health "$URL" 600 || { podman logs --tail 30 "$ctr"; exit 1; }
podman healthcheck run "$ctr" >/dev/null || { echo "FAIL: compose's healthcheck says unhealthy"; exit 1; }
log "compose profile cpu: healthy after $(elapsed $t)s on port $PORT"
"$PYTHON" "$CONF/smoke.py" requests "$URL"
(cd "$REPO" && "$PODMAN_COMPOSE" --profile cpu stop) >>"$WORK/compose.log" 2>&1 || { cat "$WORK/compose.log"; exit 1; }
code=$(podman inspect "$ctr" --format '{{.State.ExitCode}}')
[ "$code" = 0 ] || { podman logs --tail 30 "$ctr"; echo "FAIL: exit status $code after podman-compose stop"; exit 1; }
(cd "$REPO" && "$PODMAN_COMPOSE" --profile cpu down -v) >>"$WORK/compose.log" 2>&1 || { cat "$WORK/compose.log"; exit 1; }
[ -z "$(podman ps -aq --filter label=io.podman.compose.project=policymix --filter label=com.docker.compose.service=cpu)" ] || { echo "FAIL: compose down left containers"; exit 1; }
log "compose stop (exit 0) and down"

log "PASS: base ${T_BASE}s, build ${T_BUILD}s, health ${T_HEALTH}s, total $((SECONDS - T0))s"
