#!/usr/bin/env bash
# One entry point for a fresh machine: sets up what is missing, then runs the job asked for.
#   ./dev.sh demo       the main job: the two-node lab on this machine running examples/lab.yaml
#   ./dev.sh demo-down  stop the demo's processes (by pid) and remove the lab
#   ./dev.sh test       lint, type-check and the whole test suite (what CI runs)
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
# gcc and libssl-dev build the native replication lane (src/hvha/replication/native/lane.c)
APT_PACKAGES=(iproute2 iputils-ping procps keepalived openssh-server fuse3 qemu-system-x86 rsync nftables
              gcc libssl-dev)

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
  local lane=src/hvha/replication/native
  if [ ! -x "$VENV/bin/hvha" ] || [ pyproject.toml -nt "$VENV/.stamp" ] \
      || [ ! -f $lane/liblane.so ] || [ $lane/lane.c -nt "$VENV/.stamp" ] \
      || [ $lane/express.c -nt "$VENV/.stamp" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip >/dev/null
    "$VENV/bin/pip" install -q -e '.[dev]'
    touch "$VENV/.stamp"
  fi
}

LAB=/var/lib/hvha-lab/lab
HVHA="$PWD/$VENV/bin/hvha"

stop_agent() {  # $1: lab node; SIGTERM its supervised agent (by pid file), wait for it to end
  local f="$LAB/$1/fs/var/lib/hvha/agent.pid" pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 600); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}

demo_down() {
  # the agents first, the secondary's before the primary's, while the witness still runs: the
  # primary then goes on alone and records at the witness that the other copy is outdated, so
  # the next start knows which copy is newer without an operator (docs/arbitration.md)
  if [ -x "$HVHA" ]; then
    local rc=0 first=node2 last=node1
    "$HVHA" state web --socket "$LAB/node1/fs/var/lib/hvha/control.sock" >/dev/null 2>&1 || rc=$?
    if [ "$rc" -eq 4 ]; then first=node1; last=node2; fi   # exit 4: SECOND
    stop_agent "$first"
    stop_agent "$last"
  fi
  for f in "$LAB"/demo/*.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f"); kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$f"
  done
  [ -x "$HVHA" ] && "$HVHA" lab down || true
}

demo() {
  [ "$(id -u)" -eq 0 ] || { echo "the lab needs root (network namespaces)" >&2; exit 1; }
  "$HVHA" validate examples/lab.yaml
  demo_down >/dev/null 2>&1 || true
  if [ -d "$LAB" ] && [ ! -f "$LAB/lab.json" ]; then
    # a purged lab leaves the demo's own files behind; the lab refuses a non-empty foreign root
    rm -rf "$LAB/app" "$LAB/demo" "$LAB/bundles" "$LAB/cluster.key"
  fi
  "$HVHA" lab up                       # namespaces, bridges, an sshd per node
  install -d -m 700 "$LAB/app" "$LAB/demo"
  install -m 700 examples/lab-app/* "$LAB/app/"
  if [ ! -s "$LAB/cluster.key" ]; then
    (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$LAB/cluster.key")
  fi
  # the witness is the third machine's job: started here by hand, as an operator would
  # (with a state directory: its data fences outlive a restart, docs/arbitration.md)
  (umask 077; exec ip netns exec lab-witness setsid "$HVHA" witness --cluster lab \
    --secret-file "$LAB/cluster.key" --state-dir "$LAB/demo/witness-state" \
    >"$LAB/demo/witness.log" 2>&1 </dev/null) &
  echo $! >"$LAB/demo/witness.pid"
  # the real control plane, over SSH: package pushed into /opt/hvha/venv on each node, bundle,
  # supervised agent, modules up in graph order
  "$HVHA" apply examples/lab.yaml --auto-approve
  "$HVHA" status --socket "$LAB/node1/fs/var/lib/hvha/control.sock"
  echo "client through the VIP: $(ip netns exec lab-client python3 -c 'import socket; print(socket.create_connection(("10.77.0.100", 8080), 2).recv(64).decode().strip())')"
  cat <<EOF2
Try:  $HVHA plan examples/lab.yaml                       # "No changes."
      ssh -i $LAB/id_ed25519 -o UserKnownHostsFile=$LAB/known_hosts root@10.77.0.11 /opt/hvha/venv/bin/hvha swap web
      $HVHA status --watch --socket $LAB/node2/fs/var/lib/hvha/control.sock
      $HVHA reconcile examples/lab.yaml --interval 10s  # then stop an agent or edit a bundle on a node
Stop: ./dev.sh demo-down
EOF2
}

case "${1:-}" in
  demo)
    setup
    demo
    ;;
  demo-down)
    demo_down
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
    echo "usage: ./dev.sh demo|demo-down|test|setup" >&2
    exit 2
    ;;
esac
