#!/usr/bin/env bash
# The whole test suite on a fresh machine: creates .venv, installs edgekit with its dev extra,
# then lint (ruff), format check, mypy --strict, and pytest (default tier).
#   scripts/test.sh            default tier (< 15 minutes on 2 cores)
#   scripts/test.sh --slow     the slow soak/fault tier only
#   scripts/test.sh -k digits  any other arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# The MQTT tests start their own Mosquitto (Debian package `mosquitto`) on free loopback ports.
# The emulated-device tests run aarch64 runtimes under user-mode QEMU (`qemu-user-static`).
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
apt_install() {
  echo "== installing $* (apt-get)"
  $SUDO apt-get install -y -q "$@" >/dev/null \
    || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q "$@" >/dev/null; }
}
if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; then
  apt_install mosquitto mosquitto-clients
fi
if ! command -v qemu-aarch64-static >/dev/null; then
  apt_install qemu-user-static
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'

echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy --strict"
scripts/typecheck.sh
echo "== pytest"
marker="not slow"
if [ "${1:-}" = "--slow" ]; then
  marker="slow"
  shift
fi
set +e
.venv/bin/python -m pytest -m "$marker" "$@"
status=$?
set -e
# pytest exits 5 when a marker selects no test (e.g. no slow tests yet): not a failure.
if [ "$status" -eq 5 ] && [ "$marker" = "slow" ]; then
  echo "no slow tests selected"
  exit 0
fi
exit "$status"
