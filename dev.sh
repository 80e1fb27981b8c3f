#!/usr/bin/env bash
# Set up this checkout (idempotent) and run one job.
#   ./dev.sh fleet   simulated fleet against a local mutual-TLS Mosquitto (the main job)
#   ./dev.sh broker  a local mutual-TLS Mosquitto until Ctrl-C
#   ./dev.sh agent   the agent daemon for dev device dev-0001 against that broker
#   ./dev.sh test    ruff, mypy (strict), the import contracts and the test suite
#   ./dev.sh bench   the benchmark suite
#   ./dev.sh setup   only install
set -euo pipefail
cd "$(dirname "$0")"

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

APT_LOG=.smartmi-dev/apt.log  # apt-get's output, kept out of the job's own

# apt-get install PACKAGES, its output in $APT_LOG (its tail shown if it fails). Debian
# starts a package's system service on install (a Mosquitto on 1883, a nats-server): a
# policy-rc.d that refuses keeps them from starting, and nats-server's unit is disabled.
apt_install() {
    echo "installing $* (apt-get; its output goes to $APT_LOG)" >&2
    mkdir -p "$(dirname "$APT_LOG")"
    local policy=/usr/sbin/policy-rc.d ours=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
        as_root chmod 755 "$policy"
        ours=1
    fi
    local rc=0
    { as_root apt-get update -q && as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "$@"; } >"$APT_LOG" 2>&1 || rc=$?
    if [ "$ours" -eq 1 ]; then as_root rm -f "$policy"; fi
    if [ "$rc" -ne 0 ]; then
        tail -n 20 "$APT_LOG" >&2
        echo "apt-get install $* failed (exit $rc); the whole output is in $APT_LOG" >&2
        exit "$rc"
    fi
    if [[ " $* " == *" nats-server "* ]] && command -v systemctl >/dev/null; then
        as_root systemctl disable --now nats-server >/dev/null 2>&1 || true
    fi
}

# The programs a job needs (nats-server only for a cluster, Chromium only for the tests,
# which look at the report page in it), then the package in .venv, installed again only
# when pyproject.toml changed (the install is editable).
setup() {
    local missing=() need_nats="$1" need_browser="$2"
    command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
    command -v mosquitto_sub >/dev/null || missing+=(mosquitto-clients)  # captures (--capture)
    if [ "$need_nats" -eq 1 ]; then
        command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || missing+=(nats-server)
    fi
    if [ "$need_browser" -eq 1 ]; then
        command -v chromium >/dev/null || missing+=(chromium)
    fi
    command -v openssl >/dev/null || missing+=(openssl)
    if [ ${#missing[@]} -gt 0 ]; then
        apt_install "${missing[@]}"
    fi
    if [ ! -x .venv/bin/python ] && ! python3 -m venv .venv 2>/dev/null; then
        # Debian ships venv's pip bootstrap separately.
        rm -rf .venv
        apt_install python3-venv
        python3 -m venv .venv
    fi
    local stamp=.venv/.smartmi-installed want
    want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "installing the package and its test extras into .venv (pip)" >&2
        .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
        echo "$want" >"$stamp"
    fi
}

job="${1:-}"
shift || true
case "$job" in
    fleet|broker|agent|test|bench|setup) ;;
    *) echo "usage: ./dev.sh fleet|broker|agent|test|bench|setup [ARGS...]" >&2; exit 2 ;;
esac
need_nats=0  # the tests and benchmark run clusters; another job only with --cluster
case "$job $*" in test*|bench*|*--cluster*) need_nats=1 ;; esac
need_browser=0
[ "$job" = test ] && need_browser=1
setup "$need_nats" "$need_browser"
case "$job" in
    setup) ;;
    broker) exec .venv/bin/smartmi-sim broker up "$@" ;;
    agent)
        .venv/bin/smartmi-sim agent-config dev-0001 -o .smartmi-dev/dev-0001.toml
        exec .venv/bin/smartmi-agent --config .smartmi-dev/dev-0001.toml run "$@"
        ;;
    fleet)
        exec .venv/bin/smartmi-sim run --devices 200 \
            --scenario simulator/scenarios/smoke.toml --report report.json \
            --timeline timeline.json --capture capture.txt --html report.html "$@"
        ;;
    test)
        .venv/bin/ruff check .
        .venv/bin/mypy
        .venv/bin/lint-imports --no-cache  # the layering of ARCHITECTURE.md
        exec .venv/bin/pytest "$@"
        ;;
    bench) exec .venv/bin/python -m bench "$@" ;;
esac
