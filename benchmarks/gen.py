"""Generate a valid cluster file with N modules (mixed kvm and app), for benchmarks and tests."""

from __future__ import annotations


def cluster_yaml(n: int) -> str:
    lines = [
        f"# generated: {n} modules",
        "cluster:", f"  name: bench{n}", "  secret: {file: /etc/hvha/cluster.key}",
        "nodes:",
        "  - name: n1", "    address: 10.0.0.11",
        "    heartbeat: {lan: 10.0.0.11, repl: 10.9.0.11}",
        "  - name: n2", "    address: 10.0.0.12",
        "    heartbeat: {lan: 10.0.0.12, repl: 10.9.0.12}",
        "heartbeat:", "  interval: 1s", "  timeout: 5s", "  networks:",
        "    - {name: lan, subnet: 10.0.0.0/16}",
        "    - {name: repl, subnet: 10.9.0.0/24, replication: true}",
        "witness:", "  arbiter: {address: 10.0.0.3}",
        "modules:",
    ]
    for i in range(n):
        vip = f"10.0.{4 + i // 250}.{1 + i % 250}/16"
        if i % 2:
            lines += [
                f"  - name: app{i}", "    kind: app", "    payload:",
                f"      start: /opt/app{i}/start", f"      stop: /opt/app{i}/stop",
                f"      status: /opt/app{i}/status",
                f"    replicated: [{{path: /srv/app{i}, exclude: ['*.tmp']}}]",
                f"    vip: {{address: {vip}, interface: eth0}}",
                "    checkers:",
                f"      - {{name: http, type: tcp, host: 10.0.0.11, port: {8000 + i % 1000}}}",
                f"      - {{name: proc, type: process, process: app{i}}}",
                f"    failover: {{preferred: n{1 + i % 2}, "
                "restart_budget: {count: 3, window: 24h}}",
                f"    variables: {{INSTANCE: '{i}'}}",
            ]
        else:
            lines += [
                f"  - name: vm{i}", "    kind: kvm", "    payload:", f"      vm: vm{i}",
                f"      directory: /var/lib/vms/vm{i}",
                f"    vip: {{address: {vip}, interface: br0}}",
                "    stop: {mode: shutdown, graceful_timeout: 2m}",
                "    checkers: [{type: vm_state}]",
                f"    failover: {{preferred: n{1 + i % 2}}}",
            ]
    return "\n".join(lines) + "\n"
