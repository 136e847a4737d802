"""Malformed cluster files, as sysadmins really write them: each gets the right code, line, column.

Every case is the small valid ``BASE`` below (modelled on examples/lab.yaml, plus a KVM module)
with one or two textual edits. The expected position is not hard-coded: it is found by searching
the edited text for a marker (``^`` in the marker is the exact column; without it, the marker's
first character). A case that the validator gets wrong stays asserting the right behaviour and is
marked ``xfail(strict=True)`` with the bug it shows.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from hvha.config.diagnostics import CODES, Diagnostic, Severity
from hvha.config.loader import MAX_FILE_BYTES
from hvha.config.validate import Validation, validate_bytes, validate_file

BASE = """\
# Two-node lab: one application module and one KVM VM.
cluster:
  name: lab
  secret:
    file: /etc/hvha/cluster.key

nodes:
  - name: node1
    address: 10.77.0.11
    transport:
      type: ssh
      user: root
      key_file: /root/.ssh/id_ed25519
    heartbeat:
      lan: 10.77.0.11
      repl: 10.78.0.11
  - name: node2
    address: 10.77.0.12
    transport:
      type: ssh
      user: root
      key_file: /root/.ssh/id_ed25519
    heartbeat:
      lan: 10.77.0.12
      repl: 10.78.0.12

heartbeat:
  interval: 1s
  timeout: 5s
  networks:
    - name: lan
      subnet: 10.77.0.0/24
    - name: repl
      subnet: 10.78.0.0/24
      replication: true

witness:
  arbiter:
    address: 10.77.0.3

modules:
  - name: web
    kind: app
    payload:
      start: /opt/web/start
      stop: /opt/web/stop
      status: /opt/web/status
    replicated:
      - path: /srv/web
        exclude: ["*.tmp", "cache/"]
    vip:
      address: 10.77.0.100/24
      interface: eth0
    checkers:
      - name: http
        type: tcp
        host: 10.77.0.100
        port: 8080
        interval: 10s
        timeout: 5s
    failover:
      preferred: node1
      failback: true

  - name: db
    kind: kvm
    payload:
      vm: db01
      directory: /var/lib/hvha/vms/db01
    vip:
      address: 10.77.0.101/24
    checkers:
      - type: vm_state
    failover:
      preferred: node2
    depends_on: [web]
"""

SECOND_VM = """\
  - name: db2
    kind: kvm
    payload:
      vm: db02
      directory: /var/lib/hvha/vms/db02
    vip:
      address: 10.77.0.102/24
"""

# Fragments reused by several cases (each occurs exactly once in BASE).
NODE2_ADDRESS = "    address: 10.77.0.12\n"
WEB_FAILOVER = "      preferred: node1\n      failback: true\n"
DB_DEPENDS = "    depends_on: [web]\n"
HB_TIMING = "  interval: 1s\n  timeout: 5s\n"
WEB_PAYLOAD_STATUS = "      status: /opt/web/status\n"
WITNESS = "witness:\n  arbiter:\n    address: 10.77.0.3\n\n"
SECRET = "  secret:\n    file: /etc/hvha/cluster.key\n"


@dataclass(frozen=True)
class Case:
    id: str
    code: str
    edits: tuple[tuple[str, str], ...] = ()
    at: str | None = None  # marker in the edited text; None: the expected position is 1:1
    col: bool = True  # also check the column
    text: str | None = None  # the whole file, instead of BASE + edits
    encoding: str = "utf-8"
    hint: str | None = None  # text expected in the hint of the diagnostic
    warning: bool = False  # the diagnostic is a warning: the file is still valid
    bug: str | None = None  # known validator bug: the case is a strict xfail


def edit(*pairs: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    return pairs


def mutate(case: Case) -> str:
    if case.text is not None:
        return case.text
    text = BASE
    for old, new in case.edits:
        assert text.count(old) == 1, f"{case.id}: edit target {old!r} is not unique in the text"
        text = text.replace(old, new)
    return text


def locate(text: str, marker: str | None) -> tuple[int, int]:
    """1-based (line, col) of ``marker`` in ``text`` (at its ``^`` if it has one)."""
    if marker is None:
        return (1, 1)
    needle = marker.replace("^", "")
    offset = marker.index("^") if "^" in marker else 0
    assert text.count(needle) == 1, f"marker {needle!r} must occur exactly once"
    index = text.index(needle) + offset
    line = text.count("\n", 0, index) + 1
    col = index - (text.rfind("\n", 0, index) + 1) + 1
    return line, col


def run(case: Case) -> tuple[str, Validation]:
    text = mutate(case)
    return text, validate_bytes(text.encode(case.encoding), "cluster.yaml")


def rendered(v: Validation) -> str:
    return "\n".join(d.render() for d in v.report) or "(no diagnostics)"


def deep_list(depth: int) -> str:
    return "[" * depth + "x" + "]" * depth


LOL_LEVELS = "".join(
    f"      L{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]\n" for i in range(1, 9)
)

CASES = [
    # ---------------------------------------------------------------- 1xx: reading the file
    Case("hv102-latin1-comment", "HV102",
         edit(("  name: lab\n", "  name: lab   # serveur de l'équipe\n")),
         at="é", encoding="latin-1"),
    Case("hv102-latin1-user-name", "HV102",
         edit(("      user: root\n      key_file: /root/.ssh/id_ed25519\n    heartbeat:\n"
               "      lan: 10.77.0.12",
               "      user: rené\n      key_file: /root/.ssh/id_ed25519\n    heartbeat:\n"
               "      lan: 10.77.0.12")),
         at="é", encoding="latin-1"),
    Case("hv102-utf16-notepad", "HV102", encoding="utf-16"),
    Case("hv103-glob-unquoted-looks-like-alias", "HV103",
         edit(('        exclude: ["*.tmp", "cache/"]\n', "        exclude: *.tmp\n")),
         at="^*.tmp"),
    Case("hv103-windows-path-in-double-quotes", "HV103",
         edit(("      directory: /var/lib/hvha/vms/db01\n",
               '      directory: "D:\\VMs\\db01"\n')),
         at="D:^\\VMs"),
    Case("hv103-colon-space-in-command", "HV103",
         edit(("      start: /opt/web/start\n", "      start: echo Starting: web\n")),
         at="Starting^: web"),
    Case("hv103-unclosed-flow-list", "HV103",
         edit(('        exclude: ["*.tmp", "cache/"]\n', '        exclude: ["*.tmp", "cache/"\n')),
         at="^    vip:\n      address: 10.77.0.100", col=False),
    Case("hv103-key-indented-one-space-too-far", "HV103",
         edit((NODE2_ADDRESS, "     address: 10.77.0.12\n")), at="address^: 10.77.0.12"),
    Case("hv103-key-indented-one-space-short", "HV103",
         edit((NODE2_ADDRESS, "   address: 10.77.0.12\n")), at="   ^address: 10.77.0.12"),
    Case("hv103-missing-space-after-colon", "HV103",
         edit((HB_TIMING, "  interval: 1s\n  timeout:5s\n")), at="^timeout:5s", col=False),
    Case("hv103-unclosed-quote-at-end", "HV103",
         edit((DB_DEPENDS, "    depends_on: ['web]\n")), at="^'web]", col=False),
    Case("hv103-syntax-error-not-masked-by-tab-in-script", "HV103",
         edit(("      start: /opt/web/start\n",
               "      start: |\n        if true; then\n        \techo hi\n        fi\n"),
              ("      stop: /opt/web/stop\n", "      stop: echo Stopping: web\n")),
         at="Stopping^: web"),
    Case("hv104-tab-after-list-dash", "HV104",
         edit(("  - name: node2\n", "  -\tname: node2\n")), at="-^\tname"),
    Case("hv104-tab-indented-heartbeat", "HV104",
         edit(("      lan: 10.77.0.12\n", "\t  lan: 10.77.0.12\n")),
         at="\t  lan"),
    Case("hv104-tab-after-spaces", "HV104",
         edit(("        port: 8080\n", "      \t  port: 8080\n")),
         at="      ^\t  port"),
    Case("hv105-duplicate-key-in-node", "HV105",
         edit((NODE2_ADDRESS, NODE2_ADDRESS + "    address: 10.77.0.13\n")),
         at="    ^address: 10.77.0.13"),
    Case("hv105-forgotten-dash-before-second-node", "HV105",
         edit(("  - name: node2\n", "    name: node2\n")), at="    ^name: node2"),
    Case("hv105-second-modules-section", "HV105",
         edit((DB_DEPENDS, DB_DEPENDS + "\nmodules:\n  - name: extra\n    kind: app\n")),
         at="\n^modules:\n  - name: extra"),
    Case("hv106-billion-laughs-in-variables", "HV106",
         edit((WEB_FAILOVER, WEB_FAILOVER + "    variables:\n      L0: &l0 [lol, lol]\n"
               + LOL_LEVELS)),
         at="L6: ^&l6"),
    Case("hv106-recursive-alias", "HV106",
         edit((WEB_FAILOVER, WEB_FAILOVER + "    variables: &vars\n      SELF: *vars\n")),
         at="variables: ^&vars"),
    Case("hv107-automatic-yes", "HV107",
         edit((WEB_FAILOVER, "      automatic: yes\n" + WEB_FAILOVER)),
         at="automatic: ^yes", hint="true/false"),
    Case("hv107-vm-named-no", "HV107",
         edit(("      vm: db01\n", "      vm: no\n")), at="vm: ^no"),
    Case("hv107-interface-off", "HV107",
         edit(("      interface: eth0\n", "      interface: off\n")), at="interface: ^off"),
    Case("hv107-replication-on", "HV107",
         edit(("      replication: true\n", "      replication: on\n")), at="replication: ^on"),
    Case("hv108-stability-window-1-30", "HV108",
         edit((WEB_FAILOVER, WEB_FAILOVER + "      stability_window: 1:30\n")),
         at="stability_window: ^1:30"),
    Case("hv109-octal-umask-variable", "HV109",
         edit((WEB_FAILOVER, WEB_FAILOVER + "    variables:\n      UMASK: 0755\n")),
         at="UMASK: ^0755"),
    Case("hv110-numeric-variable-name", "HV110",
         edit((WEB_FAILOVER, WEB_FAILOVER + "    variables:\n      8080: http\n")),
         at="^8080: http"),
    Case("hv110-list-as-key", "HV110",
         edit((WEB_FAILOVER, WEB_FAILOVER + "    variables:\n      ? [a, b]\n      : x\n")),
         at="? ^[a, b]"),
    Case("hv111-deeply-nested-variable", "HV111",
         edit((WEB_FAILOVER, WEB_FAILOVER + f"    variables:\n      DEEP: {deep_list(80)}\n")),
         at="^DEEP:", col=False),
    Case("hv112-two-documents", "HV112",
         edit((DB_DEPENDS, DB_DEPENDS + "---\ncluster:\n  name: other\n")),
         at="---\n^cluster:\n  name: other"),
    Case("hv113-empty-file", "HV113", text=""),
    Case("hv113-only-comments", "HV113", text="# cluster.yaml: TODO\n\n# fill in\n"),
    Case("hv113-only-document-marker", "HV113", text="# cluster.yaml\n---\n# to do\n"),
    Case("hv114-ansible-vault-tag", "HV114",
         edit((SECRET, "  secret: !vault |\n    $ANSIBLE_VAULT;1.1;AES256\n    6162636465\n")),
         at="secret: ^!vault"),
    Case("hv114-custom-tag-on-mapping", "HV114",
         edit((SECRET, "  secret: !secret\n    file: /etc/hvha/cluster.key\n")),
         at="secret: ^!secret"),
    Case("hv114-python-tuple-tag", "HV114",
         edit(('        exclude: ["*.tmp", "cache/"]\n',
               '        exclude: !!python/tuple ["*.tmp", "cache/"]\n')),
         at="exclude: ^!!python/tuple"),
    Case("hv114-python-name-tag", "HV114",
         edit(("      status: /opt/web/status\n", "      status: !!python/name:os.system ''\n")),
         at="status: ^!!python"),
    # ---------------------------------------------------------------- 2xx: shape
    Case("hv201-timout-typo", "HV201",
         edit((HB_TIMING, "  interval: 1s\n  timout: 5s\n")), at="^timout:",
         hint="did you mean 'timeout'?"),
    Case("hv201-intervall-typo", "HV201",
         edit(("  interval: 1s\n", "  intervall: 1s\n")), at="^intervall:",
         hint="did you mean 'interval'?"),
    Case("hv201-prefered-typo", "HV201",
         edit(("      preferred: node1\n", "      prefered: node1\n")), at="^prefered:",
         hint="did you mean 'preferred'?"),
    Case("hv201-adress-typo-in-node", "HV201",
         edit((NODE2_ADDRESS, "    adress: 10.77.0.12\n")), at="^adress:",
         hint="did you mean 'address'?"),
    Case("hv201-module-singular", "HV201",
         edit(("\nmodules:\n", "\nmodule:\n")), at="^module:",
         hint="did you mean 'modules'?"),
    Case("hv202-node-without-address", "HV202",
         edit((NODE2_ADDRESS, "")), at="- ^name: node2"),
    Case("hv202-cluster-without-secret", "HV202",
         edit((SECRET, "")), at="  ^name: lab"),
    Case("hv202-tcp-checker-without-port", "HV202",
         edit(("        port: 8080\n", "")), at="- ^name: http"),
    Case("hv202-kvm-payload-without-directory", "HV202",
         edit(("      directory: /var/lib/hvha/vms/db01\n", "")), at="^vm: db01"),
    Case("hv203-nodes-as-mapping", "HV203",
         edit(("  - name: node1\n    address: 10.77.0.11\n",
               "  node1:\n    address: 10.77.0.11\n"),
              ("  - name: node2\n    address: 10.77.0.12\n",
               "  node2:\n    address: 10.77.0.12\n")),
         at="^node1:\n"),
    Case("hv203-port-quoted", "HV203",
         edit(("        port: 8080\n", '        port: "8080"\n')), at='^"8080"'),
    Case("hv203-address-left-empty", "HV203",
         edit((NODE2_ADDRESS, "    address:\n")), at="^address:\n", col=False),
    Case("hv203-failback-quoted", "HV203",
         edit(("      failback: true\n", '      failback: "true"\n')), at='^"true"'),
    Case("hv203-document-is-a-list", "HV203", text="- node1\n- node2\n"),
    Case("hv204-kind-kvmm", "HV204",
         edit(("    kind: kvm\n", "    kind: kvmm\n")), at="^kvmm",
         hint="did you mean 'kvm'?"),
    Case("hv204-port-70000", "HV204",
         edit(("        port: 8080\n", "        port: 70000\n")), at="^70000"),
    Case("hv204-port-0", "HV204",
         edit(("        port: 8080\n", "        port: 0\n")), at="port: ^0"),
    Case("hv204-checker-type-http", "HV204",
         edit(("        type: tcp\n", "        type: http\n")), at="type: ^http"),
    Case("hv204-witness-arbiter-and-ping", "HV204",
         edit((WITNESS, WITNESS.replace("\n\n", "\n") + "  ping: [10.77.0.1]\n\n")),
         at="witness:\n  ^arbiter:"),
    Case("hv204-no-heartbeat-network", "HV204",
         edit(("  networks:\n    - name: lan\n      subnet: 10.77.0.0/24\n"
               "    - name: repl\n      subnet: 10.78.0.0/24\n      replication: true\n",
               "  networks: []\n")),
         at="networks: ^[]"),
    Case("hv204-unit-and-start-commands", "HV204",
         edit((WEB_PAYLOAD_STATUS, WEB_PAYLOAD_STATUS + "      unit: web.service\n")),
         at="^start: /opt/web/start"),
    Case("hv204-process-checker-max-below-min", "HV204",
         edit(("      - type: vm_state\n", "      - type: vm_state\n      - type: process\n"
               "        process: qemu\n        min: 2\n        max: 1\n")),
         at="max: ^1"),
    Case("hv205-timeout-bare-number", "HV205",
         edit((HB_TIMING, "  interval: 1s\n  timeout: 5\n")), at="timeout: ^5\n",
         hint="700ms, 5s"),
    Case("hv205-timeout-5-seconds", "HV205",
         edit((HB_TIMING, "  interval: 1s\n  timeout: 5 seconds\n")), at="^5 seconds"),
    Case("hv205-interval-with-space", "HV205",
         edit(("  interval: 1s\n", "  interval: 500 ms\n")), at="^500 ms"),
    Case("hv205-checker-interval-float", "HV205",
         edit(("        interval: 10s\n", "        interval: 1.5\n")), at="^1.5"),
    Case("hv206-heartbeat-address-300", "HV206",
         edit(("      lan: 10.77.0.11\n", "      lan: 10.77.0.300\n")), at="^10.77.0.300"),
    Case("hv206-node-address-300", "HV206",
         edit((NODE2_ADDRESS, "    address: 10.77.0.312\n")), at="^10.77.0.312"),
    Case("hv206-witness-address-256", "HV206",
         edit(("    address: 10.77.0.3\n", "    address: 10.77.0.256\n")), at="^10.77.0.256"),
    Case("hv206-vip-without-prefix", "HV206",
         edit(("      address: 10.77.0.100/24\n", "      address: 10.77.0.100\n")),
         at="address: ^10.77.0.100\n      interface"),
    Case("hv206-heartbeat-address-outside-subnet", "HV206",
         edit(("      repl: 10.78.0.12\n", "      repl: 10.79.0.12\n")), at="^10.79.0.12"),
    Case("hv206-subnet-prefix-33", "HV206",
         edit(("      subnet: 10.78.0.0/24\n", "      subnet: 10.78.0.0/33\n")),
         at="^10.78.0.0/33"),
    Case("hv207-secret-inline", "HV207",
         edit((SECRET, "  secret: hunter2\n")), at="^hunter2"),
    Case("hv207-winrm-password-inline", "HV207",
         edit(("      user: root\n      key_file: /root/.ssh/id_ed25519\n    heartbeat:\n"
               "      lan: 10.77.0.12",
               "      user: root\n      password: hunter2\n    heartbeat:\n"
               "      lan: 10.77.0.12")),
         at="^hunter2"),
    Case("hv208-cluster-name-uppercase", "HV208",
         edit(("  name: lab\n", "  name: Lab_Cluster\n")), at="^Lab_Cluster"),
    Case("hv208-node-name-with-space", "HV208",
         edit(("  - name: node2\n", '  - name: "node 2"\n')), at='^"node 2"'),
    Case("hv208-module-name-starts-with-digit", "HV208",
         edit(("  - name: db\n", "  - name: 2db\n")), at="^2db"),
    Case("hv208-network-name-starts-with-digit", "HV208",
         edit(("    - name: repl\n", "    - name: 2nd-link\n")), at="^2nd-link"),
    Case("hv208-checker-name-with-space", "HV208",
         edit(("      - name: http\n", '      - name: "http check"\n')), at='^"http check"'),
    Case("hv208-variable-name-with-dash", "HV208",
         edit((WEB_FAILOVER, WEB_FAILOVER + "    variables:\n      APP_PORT: 8080\n"
               "      LOG-LEVEL: debug\n")),
         at="^LOG-LEVEL"),
    # ---------------------------------------------------------------- 3xx: meaning
    Case("hv301-one-node", "HV301",
         edit(("  - name: node2\n    address: 10.77.0.12\n    transport:\n      type: ssh\n"
               "      user: root\n      key_file: /root/.ssh/id_ed25519\n    heartbeat:\n"
               "      lan: 10.77.0.12\n      repl: 10.78.0.12\n", "")),
         at="^nodes:"),
    Case("hv301-three-nodes", "HV301",
         edit(("      repl: 10.78.0.12\n",
               "      repl: 10.78.0.12\n  - name: node3\n    address: 10.77.0.13\n"
               "    heartbeat: {lan: 10.77.0.13, repl: 10.78.0.13}\n")),
         at="^nodes:"),
    Case("hv302-duplicate-node-name", "HV302",
         edit(("  - name: node2\n", "  - name: node1\n")),
         at="- name: ^node1\n    address: 10.77.0.12"),
    Case("hv302-duplicate-module-name", "HV302",
         edit(("  - name: db\n", "  - name: web\n")), at="- name: ^web\n    kind: kvm"),
    Case("hv302-duplicate-checker-name", "HV302",
         edit(("        timeout: 5s\n",
               "        timeout: 5s\n      - name: http\n        type: process\n"
               "        process: nginx\n")),
         at="- name: ^http\n        type: process"),
    Case("hv302-duplicate-network-name", "HV302",
         edit(("    - name: repl\n", "    - name: lan\n")),
         at="- name: ^lan\n      subnet: 10.78"),
    Case("hv302-same-vm-in-two-modules", "HV302",
         edit((DB_DEPENDS, DB_DEPENDS + SECOND_VM.replace("vm: db02", "vm: db01"))),
         at="vm: ^db01\n      directory: /var/lib/hvha/vms/db02"),
    Case("hv303-vip-is-node-address", "HV303",
         edit(("      address: 10.77.0.100/24\n", "      address: 10.77.0.11/24\n")),
         at="^10.77.0.11/24"),
    Case("hv304-vip-outside-subnets", "HV304",
         edit(("      address: 10.77.0.101/24\n", "      address: 192.168.50.10/24\n")),
         at="^192.168.50.10/24"),
    Case("hv305-directory-replicated-twice", "HV305",
         edit(('        exclude: ["*.tmp", "cache/"]\n',
               '        exclude: ["*.tmp", "cache/"]\n      - path: /srv/web/\n')),
         at="^/srv/web/\n"),
    Case("hv305-two-modules-same-directory", "HV305",
         edit(("    depends_on: [web]\n",
               "    depends_on: [web]\n    replicated:\n      - path: /var/lib/hvha/vms/db01\n"
               "      - path: /srv/web\n")),
         at="vms/db01\n      - path: ^/srv/web"),
    Case("hv305-copy-pasted-vm-directory", "HV305",
         edit((DB_DEPENDS, DB_DEPENDS + SECOND_VM.replace("vms/db02", "vms/db01"))),
         at="vm: db02\n      directory: ^/var/lib/hvha/vms/db01"),
    Case("hv306-directory-nested", "HV306",
         edit(('        exclude: ["*.tmp", "cache/"]\n',
               '        exclude: ["*.tmp", "cache/"]\n      - path: /srv/web/uploads\n')),
         at="^/srv/web/uploads"),
    Case("hv307-windows-path-in-kvm", "HV307",
         edit(("      directory: /var/lib/hvha/vms/db01\n",
               "      directory: 'D:\\VMs\\db01'\n")),
         at="^'D:"),
    Case("hv307-linux-path-in-hyperv", "HV307",
         edit(("    kind: kvm\n", "    kind: hyperv\n")),
         at="^/var/lib/hvha/vms/db01"),
    Case("hv307-relative-replicated-path", "HV307",
         edit(("      - path: /srv/web\n", "      - path: srv/web\n")), at="^srv/web"),
    Case("hv308-timeout-2s-interval-1s", "HV308",
         edit((HB_TIMING, "  interval: 1s\n  timeout: 2s\n")), at="timeout: ^2s"),
    Case("hv309-witness-is-node1", "HV309",
         edit(("    address: 10.77.0.3\n", "    address: 10.77.0.11\n")),
         at="^10.77.0.11\n\nmodules"),
    Case("hv309-witness-is-node-by-name", "HV309",
         edit((WITNESS, "witness:\n  ping: [node2]\n\n")), at="^node2]"),
    Case("hv310-heartbeat-and-replication-port", "HV310",
         edit((HB_TIMING, HB_TIMING + "  port: 4802\n"),
              (WITNESS, WITNESS + "replication:\n  port: 4802\n\n")),
         at="replication:\n  port: ^4802"),
    Case("hv310-heartbeat-port-is-default-replication-port", "HV310",
         edit((HB_TIMING, HB_TIMING + "  port: 4802\n")),
         at="^4802"),
    Case("hv310-module-port-is-heartbeat-port", "HV310",
         edit((DB_DEPENDS, DB_DEPENDS + "    replication:\n      port: 4800\n")), at="^4800"),
    Case("hv311-preferred-unknown-node", "HV311",
         edit(("      preferred: node2\n", "      preferred: node3\n")), at="^node3"),
    Case("hv311-vip-interface-unknown-node", "HV311",
         edit(("      interface: eth0\n", "      interface:\n        node1: eth0\n"
               "        nod2: eth0\n")),
         at="^nod2:"),
    Case("hv312-missing-heartbeat-address", "HV312",
         edit(("      repl: 10.78.0.12\n", "")),
         at="^heartbeat:\n      lan: 10.77.0.12"),
    Case("hv313-unknown-heartbeat-network", "HV313",
         edit(("      repl: 10.78.0.12\n", "      rep1: 10.78.0.12\n")), at="^rep1:"),
    Case("hv314-two-replication-networks", "HV314",
         edit(("      subnet: 10.77.0.0/24\n",
               "      subnet: 10.77.0.0/24\n      replication: true\n")),
         at="/24\n      replication: ^true\n\nwitness"),
    Case("hv315-same-vip-twice", "HV315",
         edit(("      address: 10.77.0.101/24\n", "      address: 10.77.0.100/24\n")),
         at="^10.77.0.100/24\n    checkers:\n      - type: vm_state"),
    Case("hv316-depends-on-cycle", "HV316",
         edit((WEB_FAILOVER, WEB_FAILOVER + "    depends_on: [db]\n")),
         at="^depends_on: [db]"),
    Case("hv317-depends-on-unknown-module", "HV317",
         edit((DB_DEPENDS, "    depends_on: [wbe]\n")), at="^wbe"),
    Case("hv317-depends-on-itself", "HV317",
         edit((DB_DEPENDS, "    depends_on: [web, db]\n")), at="^db]"),
    Case("hv318-vm-state-checker-on-app", "HV318",
         edit(("        type: tcp\n        host: 10.77.0.100\n        port: 8080\n",
               "        type: vm_state\n")),
         at="^vm_state\n        interval"),
    Case("hv319-both-nodes-same-address", "HV319",
         edit((NODE2_ADDRESS, "    address: 10.77.0.11\n")),
         at="^10.77.0.11\n    transport:\n      type: ssh\n      user: root\n"
            "      key_file: /root/.ssh/id_ed25519\n    heartbeat:\n      lan: 10.77.0.12"),
    Case("hv320-vm-directory-not-replicated", "HV320",
         edit((DB_DEPENDS, DB_DEPENDS + "    replicated:\n      - path: /var/lib/hvha/disks\n")),
         at="^/var/lib/hvha/vms/db01"),
    Case("hv321-interval-50ms", "HV321",
         edit((HB_TIMING, "  interval: 50ms\n  timeout: 5s\n")), at="^50ms"),
    Case("hv322-no-witness-is-a-warning", "HV322",
         edit((WITNESS, "")), at="^cluster:", warning=True),
    Case("hv323-checker-timeout-longer-than-interval", "HV323",
         edit(("        timeout: 5s\n", "        timeout: 15s\n")), at="^15s"),
    Case("hv325-stop-mode-on-app", "HV325",
         edit((WEB_FAILOVER, WEB_FAILOVER + "    stop:\n      mode: shutdown\n")),
         at="^mode: shutdown"),
    Case("hv325-process-option-on-tcp-checker", "HV325",
         edit(("        port: 8080\n", "        port: 8080\n        process: nginx\n")),
         at="^process: nginx"),
    Case("hv325-qemu-command-with-libvirt", "HV325",
         edit(("      directory: /var/lib/hvha/vms/db01\n",
               "      directory: /var/lib/hvha/vms/db01\n      hypervisor: libvirt\n"
               "      command: [qemu-system-x86_64, -m, '1024']\n")),
         at="^command:"),
    Case("hv324-hyperv-module-on-linux-nodes", "HV324",
         edit(("    kind: kvm\n", "    kind: hyperv\n"),
              ("      directory: /var/lib/hvha/vms/db01\n",
               "      directory: 'D:\\Hyper-V\\db01'\n")),
         at="^hyperv"),
    Case("hv324-kvm-module-on-winrm-nodes", "HV324",
         edit(("      type: ssh\n      user: root\n      key_file: /root/.ssh/id_ed25519\n"
               "    heartbeat:\n      lan: 10.77.0.12",
               "      type: winrm\n      user: administrator\n"
               "      password: {env: HVHA_WINRM_PASSWORD}\n"
               "    heartbeat:\n      lan: 10.77.0.12")),
         at="^kvm\n"),
]


def _params() -> list[object]:
    out: list[object] = []
    for case in CASES:
        marks = [pytest.mark.xfail(reason=f"BUG: {case.bug}", strict=True)] if case.bug else []
        out.append(pytest.param(case, id=case.id, marks=marks))
    return out


def test_base_is_valid_and_clean() -> None:
    v = validate_bytes(BASE.encode(), "cluster.yaml")
    assert list(v.report) == [], rendered(v)
    assert v.cluster is not None


def test_case_ids_are_unique_and_cover_codes() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 45
    covered = {c.code for c in CASES} | {"HV101"}  # HV101: test_file_too_large
    never = {"HV100", "HV200"}  # unreadable file (see test_cli_validate) / generic schema
    assert set(CODES) - never - covered == set()


@pytest.mark.parametrize("case", _params())
def test_invalid_config(case: Case) -> None:
    text, v = run(case)
    line, col = locate(text, case.at)
    found = [d for d in v.report if d.code == case.code]
    assert found, f"{case.code} not reported; got:\n{rendered(v)}"
    at = [d for d in found if d.position is not None and d.position.line == line
          and (not case.col or d.position.col == col)]
    where = f"{line}:{col}" if case.col else f"line {line}"
    assert at, f"{case.code} expected at {where}; got:\n{rendered(v)}"
    d = at[0]
    assert d.name == CODES[case.code]
    assert d.file == "cluster.yaml"
    assert d.render().startswith(f"cluster.yaml:{d.position.line}:{d.position.col}: ")
    if case.hint is not None:
        assert case.hint in d.hint, d.render()
    if case.warning:
        assert d.severity is Severity.WARNING
        assert v.report.ok and v.cluster is not None, rendered(v)
    else:
        assert d.severity is Severity.ERROR
        assert v.cluster is None


def apply(*pairs: tuple[str, str]) -> str:
    return mutate(Case("near-miss", "-", pairs))


WINRM_NODES = (
    ("      type: ssh\n      user: root\n      key_file: /root/.ssh/id_ed25519\n"
     "    heartbeat:\n      lan: 10.77.0.11",
     "      type: winrm\n      user: 'CORP\\hvha'\n      password: {env: HVHA_PW}\n"
     "    heartbeat:\n      lan: 10.77.0.11"),
    ("      type: ssh\n      user: root\n      key_file: /root/.ssh/id_ed25519\n"
     "    heartbeat:\n      lan: 10.77.0.12",
     "      type: winrm\n      user: 'CORP\\hvha'\n      password: {env: HVHA_PW}\n"
     "    heartbeat:\n      lan: 10.77.0.12"),
)

NEAR_MISSES = [
    pytest.param(apply(("      vm: db01\n", '      vm: "no"\n')), id="quoted-no-as-vm-name"),
    pytest.param(apply(("      interface: eth0\n", "      interface: 'off'\n")),
                 id="quoted-off-as-interface"),
    pytest.param(apply((WEB_FAILOVER, "      automatic: false\n" + WEB_FAILOVER)),
                 id="explicit-false"),
    pytest.param(apply((WEB_FAILOVER, WEB_FAILOVER + "      stability_window: 1m30s\n")),
                 id="duration-1m30s"),
    pytest.param(apply((WEB_FAILOVER, WEB_FAILOVER + '    variables:\n      UMASK: "0755"\n'
                        '      DEBUG: true\n      WORKERS: 4\n')),
                 id="quoted-octal-variable"),
    pytest.param(apply((NODE2_ADDRESS, "    address: node2.example.com\n")),
                 id="node-address-host-name"),
    pytest.param(apply(("      address: 10.77.0.100/24\n", "      address: fd00::100/64\n")),
                 id="ipv6-vip-with-interface"),
    pytest.param(apply(('        exclude: ["*.tmp", "cache/"]\n',
                        '        exclude: ["*.tmp", "cache/"]\n      - path: /srv/webapp\n')),
                 id="sibling-directories-are-not-nested"),
    pytest.param(apply((HB_TIMING, "  interval: 1s\n  timeout: 3s\n")),
                 id="timeout-exactly-3x-interval"),
    pytest.param(apply((HB_TIMING, "  interval: 100ms\n  timeout: 300ms\n")),
                 id="timing-at-the-limits-100ms-300ms"),
    pytest.param(apply((HB_TIMING, "  interval: 200ms\n  timeout: 600ms\n")),
                 id="timing-at-the-limits-200ms-600ms"),
    pytest.param(apply(("        timeout: 5s\n", "        timeout: 10s\n")),
                 id="checker-timeout-equal-to-interval"),
    pytest.param(apply(("        port: 8080\n", "        port: 65535\n")), id="port-65535"),
    pytest.param(apply(("        port: 8080\n", "        port: 1\n")), id="port-1"),
    pytest.param(apply(("      preferred: node2\n", "      preferred: none\n")),
                 id="preferred-none"),
    pytest.param(apply((WITNESS, "witness:\n  ping: [10.77.0.1, gw.example.com]\n\n")),
                 id="ping-witness"),
    pytest.param(apply(*WINRM_NODES, ("    kind: kvm\n", "    kind: hyperv\n"),
                       ("      directory: /var/lib/hvha/vms/db01\n",
                        "      directory: 'D:\\Hyper-V\\db01'\n")),
                 id="hyperv-on-winrm-nodes"),
    pytest.param(apply(("  name: lab\n", "  name: lab   # serveur de l'équipe\n")),
                 id="utf8-accents-in-comment"),
    pytest.param(apply(("\nnodes:\n", "\nx-ssh: &ssh\n  type: ssh\n  user: root\n\nnodes:\n"),
                       ("      type: ssh\n      user: root\n      key_file: /root/.ssh/id_ed25519\n"
                        "    heartbeat:\n      lan: 10.77.0.12",
                        "      <<: *ssh\n      key_file: /root/.ssh/node2\n"
                        "    heartbeat:\n      lan: 10.77.0.12")),
                 id="x-anchor-block-and-merge-key"),
    pytest.param("\ufeff" + BASE, id="utf8-bom"),
    pytest.param(BASE.replace("\n", "\r\n"), id="crlf-line-endings"),
    pytest.param("---\n" + BASE + "...\n", id="document-markers"),
    pytest.param(apply(("        port: 8080\n", "        port: 8080    \t# trailing tab\n")),
                 id="tab-after-a-value"),
]


@pytest.mark.parametrize("text", NEAR_MISSES)
def test_near_miss_is_valid(text: str) -> None:
    """What looks like a mistake but is not must validate without a single diagnostic."""
    v = validate_bytes(text.encode(), "cluster.yaml")
    assert list(v.report) == [], rendered(v)
    assert v.cluster is not None


def test_file_too_large(tmp_path: Path) -> None:
    """A 9 MiB file (say, a log pasted by mistake) is refused before it is parsed."""
    path = tmp_path / "cluster.yaml"
    line = b"# " + b"x" * 1000 + b"\n"
    with open(path, "wb") as fh:
        fh.write(BASE.encode())
        fh.write(line * (MAX_FILE_BYTES // len(line) + 10))
    assert path.stat().st_size > MAX_FILE_BYTES
    start = time.perf_counter()
    v = validate_file(str(path))
    assert time.perf_counter() - start < 1.0
    codes = [(d.code, d.position.line, d.position.col) for d in v.report if d.position]
    assert codes == [("HV101", 1, 1)], rendered(v)
    assert v.cluster is None


def test_bytes_too_large() -> None:
    raw = BASE.encode() + b"#" * (MAX_FILE_BYTES + 1)
    v = validate_bytes(raw, "cluster.yaml")
    assert [d.code for d in v.report] == ["HV101"]


def test_billion_laughs_refused_fast() -> None:
    levels = "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 10) + "]\n"
        for i in range(9)
    )
    raw = ('a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
           + levels).encode()
    start = time.perf_counter()
    v = validate_bytes(raw, "bomb.yaml")
    elapsed = time.perf_counter() - start
    assert [d.code for d in v.report] == ["HV106"], rendered(v)
    assert elapsed < 0.5, f"alias bomb took {elapsed:.2f}s"


def test_recursive_alias_refused() -> None:
    v = validate_bytes(b"cluster: &c\n  name: lab\n  self: *c\n", "rec.yaml")
    d = [d for d in v.report if d.code == "HV106"]
    assert d and d[0].position is not None and d[0].position.line == 1, rendered(v)


@pytest.mark.parametrize("case_id", ["hv207-secret-inline", "hv207-winrm-password-inline"])
def test_inline_secret_is_not_echoed(case_id: str) -> None:
    case = next(c for c in CASES if c.id == case_id)
    _, v = run(case)
    assert any(d.code == "HV207" for d in v.report)
    out = rendered(v) + json.dumps([d.as_dict() for d in v.report])
    assert "hunter2" not in out, out


def test_all_stages_reported_in_one_run() -> None:
    """An unknown key (schema), a duplicate module name (rules), a bad duration (schema) and a
    duplicate key (loader): every one is reported, each at its own line."""
    case = Case("multi", "-", edit(
        ("      preferred: node1\n", "      prefered: node1\n"),
        ("  - name: db\n", "  - name: web\n"),
        (HB_TIMING, "  interval: 1s\n  timeout: 5 seconds\n"),
        (NODE2_ADDRESS, NODE2_ADDRESS + "    address: 10.77.0.13\n"),
    ))
    text, v = run(case)
    got = {(d.code, d.position.line, d.position.col) for d in v.report if d.position}
    expected = {
        ("HV201", *locate(text, "^prefered:")),
        ("HV302", *locate(text, "- name: ^web\n    kind: kvm")),
        ("HV205", *locate(text, "^5 seconds")),
        ("HV105", *locate(text, "    ^address: 10.77.0.13")),
    }
    assert expected <= got, rendered(v)
    assert v.cluster is None


def test_semantic_and_shape_problems_together() -> None:
    """A wrong type in one module does not hide a cycle and a bad VIP elsewhere."""
    case = Case("multi2", "-", edit(
        ("        port: 8080\n", '        port: "8080"\n'),
        (WEB_FAILOVER, WEB_FAILOVER + "    depends_on: [db]\n"),
        ("      address: 10.77.0.101/24\n", "      address: 10.77.0.11/24\n"),
        (HB_TIMING, "  interval: 1s\n  timeout: 2s\n"),
    ))
    _, v = run(case)
    codes = {d.code for d in v.report}
    assert {"HV203", "HV316", "HV303", "HV308"} <= codes, rendered(v)


def test_diagnostics_are_sorted_by_position() -> None:
    case = next(c for c in CASES if c.id == "hv302-duplicate-module-name")
    _, v = run(case)
    v2 = validate_bytes(mutate(case).replace("5s", "5").encode(), "cluster.yaml")
    assert len(v2.report.items) >= 3  # the duplicate name and the bare durations
    for report in (v.report, v2.report):
        keys = [(d.position.line, d.position.col) for d in report if d.position]
        assert keys == sorted(keys)


def test_diagnostic_render_format() -> None:
    case = next(c for c in CASES if c.id == "hv201-timout-typo")
    text, v = run(case)
    line, col = locate(text, "^timout:")
    d: Diagnostic = next(iter(v.report))
    assert d.render() == (
        f"cluster.yaml:{line}:{col}: error[HV201 unknown-key] at heartbeat.timout: "
        "unknown key 'timout'\n  hint: did you mean 'timeout'?"
    )
