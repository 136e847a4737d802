#!/usr/bin/env bash
# One entry point for a fresh machine: sets up what is missing, then runs the job asked for.
#   ./dev.sh demo   the main job: the embedded two-node lab example, validated, graphed, compiled
#   ./dev.sh test   lint, type-check and the whole test suite (what CI runs)
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
APT_PACKAGES=(iproute2 iputils-ping procps)

need_apt() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
      echo "installing Debian packages: ${missing[*]}"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
      echo "warning: missing Debian packages ${missing[*]} (run as root to install them)" >&2
    fi
  fi
}

setup() {
  need_apt
  if [ ! -x "$VENV/bin/hvha" ] || [ pyproject.toml -nt "$VENV/.stamp" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip >/dev/null
    "$VENV/bin/pip" install -q -e '.[dev]'
    touch "$VENV/.stamp"
  fi
}

case "${1:-}" in
  demo)
    setup
    "$VENV/bin/hvha" validate examples/lab.yaml
    "$VENV/bin/hvha" graph examples/lab.yaml --order start
    "$VENV/bin/hvha" compile examples/lab.yaml -o out/lab
    ;;
  test)
    setup
    "$VENV/bin/ruff" check src tests benchmarks
    "$VENV/bin/mypy"
    "$VENV/bin/pytest" -q "${@:2}"
    ;;
  setup)
    setup
    ;;
  *)
    echo "usage: ./dev.sh demo|test|setup" >&2
    exit 2
    ;;
esac
