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

setup() {
    local missing=()
    command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
    command -v mosquitto_sub >/dev/null || missing+=(mosquitto-clients)  # captures (--capture)
    command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || missing+=(nats-server)  # --cluster
    command -v openssl >/dev/null || missing+=(openssl)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing ${missing[*]} (apt-get)" >&2
        as_root apt-get update -q
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
    fi
    if [ ! -x .venv/bin/python ] && ! python3 -m venv .venv 2>/dev/null; then
        # Debian ships venv's pip bootstrap separately.
        rm -rf .venv
        as_root apt-get update -q
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
        python3 -m venv .venv
    fi
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
}

job="${1:-}"
shift || true
case "$job" in
    fleet|broker|agent|test|bench|setup) ;;
    *) echo "usage: ./dev.sh fleet|broker|agent|test|bench|setup [ARGS...]" >&2; exit 2 ;;
esac
setup
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
            --timeline timeline.json --capture capture.txt "$@"
        ;;
    test)
        .venv/bin/ruff check .
        .venv/bin/mypy
        .venv/bin/lint-imports --no-cache  # the layering of ARCHITECTURE.md
        exec .venv/bin/pytest "$@"
        ;;
    bench) exec .venv/bin/python -m bench "$@" ;;
esac
