"""Hyper-V module scripts: NOT RUN ON HYPER-V.

Hyper-V (and PowerShell) cannot run in this lab, so these are golden tests of the rendered
PowerShell: the full text of each script per stop mode is pinned under
tests/golden/hyperv-render/ (review the diff, accept with ``HVHA_UPDATE_GOLDEN=1``), and the exact
cmdlets each script issues, with their switches, are asserted here against the behaviour the
issue asks for: Get-VM; Start-VM; Stop-VM -Force (shutdown) / -Save / -TurnOff per stop mode and
-TurnOff -Force as the last resort; registration in place from the replicated folder with
Compare-VM -Register reporting every incompatibility, then Import-VM; the Heartbeat integration
service (found by its culture-neutral ID) as checker; AutomaticStartAction Nothing; the virtual
switch names checked on each host. A small PowerShell lexer checks that brackets balance
outside strings and comments, which catches template slips a golden file would only pin.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from hvha.compile.render import render_module
from hvha.config.validate import validate_bytes

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "hyperv-render"
UPDATE = os.environ.get("HVHA_UPDATE_GOLDEN") == "1"
CMDLET = re.compile(r"\b((?:Get|Set|Start|Stop|Save|Resume|Import|Compare|Remove|Wait|"
                    r"Receive)-VM\w*|Get-ChildItem|Wait-Job|Stop-Job|Remove-Job)\b([^|;\n)}]*)")

BASE = {
    "cluster": {"name": "hv", "secret": {"env": "HVHA_KEY"}},
    "nodes": [{"name": "hv1", "address": "192.0.2.11",
               "transport": {"type": "winrm", "user": "admin", "password": {"env": "PW"}}},
              {"name": "hv2", "address": "192.0.2.12",
               "transport": {"type": "winrm", "user": "admin", "password": {"env": "PW"}}}],
    "heartbeat": {"interval": "1s", "timeout": "5s",
                  "networks": [{"name": "lan", "subnet": "192.0.2.0/24"}]},
    "witness": {"arbiter": {"address": "192.0.2.3"}},
}


def render(stop_mode: str = "shutdown", vm: str = "ERP-01", switch: str | None = "vSwitch-LAN",
           node: int = 0) -> dict[str, str]:
    payload: dict[str, object] = {"vm": vm, "directory": "D:\\Hyper-V\\ERP-01"}
    if switch:
        payload["switch"] = switch
    module = {"name": "erp", "kind": "hyperv", "payload": payload,
              "stop": {"mode": stop_mode, "graceful_timeout": "5m"}}
    v = validate_bytes(yaml.safe_dump({**BASE, "modules": [module]}).encode(), "hv.yaml")
    assert v.cluster is not None, [d.render() for d in v.report]
    files = render_module(v.cluster, v.cluster.modules[0], v.cluster.nodes[node])
    return {name: text for name, (text, _mode) in files.items()}


def cmdlets(text: str) -> list[str]:
    """Each cmdlet call in a script with the switches it passes (-Name, -TurnOff, ...)."""
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    return [" ".join([m.group(1), *re.findall(r"(?<![\w$])-[A-Z]\w+", m.group(2))])
            for m in CMDLET.finditer(code)]


def balanced(text: str) -> bool:
    """Brackets balance outside '...' / "..." strings and # comments (PowerShell quoting)."""
    stack: list[str] = []
    pairs = {")": "(", "}": "{", "]": "["}
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "#":
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif c == "'":
            i += 1
            while i < n and not (text[i] == "'" and text[i + 1: i + 2] != "'"):
                i += 2 if text[i] == "'" else 1
        elif c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "`" else 1
        elif c in "({[":
            stack.append(c)
        elif c in pairs and (not stack or stack.pop() != pairs[c]):
            return False
        i += 1
    return not stack


@pytest.mark.parametrize("mode", ["shutdown", "save", "off"])
def test_rendered_scripts_are_pinned_not_run_on_hyperv(mode: str) -> None:
    for name, text in render(mode).items():
        path = GOLDEN / mode / name
        if UPDATE:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        assert path.exists(), f"missing golden {path}: run with HVHA_UPDATE_GOLDEN=1"
        assert text == path.read_text(), f"{mode}/{name} differs from the golden copy"
        assert balanced(text), f"{mode}/{name}: unbalanced brackets"


def test_prepare_registers_in_place_and_checks_switches_not_run_on_hyperv() -> None:
    text = render()["prepare.ps1"]
    assert cmdlets(text) == [
        "Get-VMSwitch -Name -ErrorAction",           # the configured switch, on this host
        "Get-VM -Name -ErrorAction",
        "Get-ChildItem -Path -Recurse -Filter",      # the .vmcx in the replicated folder
        "Compare-VM -Path -Register",                # in place: files stay replicated
        "Import-VM -CompatibilityReport",
        "Get-VMNetworkAdapter -VM",                  # every adapter's switch exists here
        "Get-VMSwitch -Name -ErrorAction",
        "Set-VM -VM -AutomaticStartAction -AutomaticStopAction",
    ]
    assert "-AutomaticStartAction Nothing -AutomaticStopAction ShutDown" in text
    assert "$VmSwitch = 'vSwitch-LAN'" in render()["env.ps1"]
    # Every incompatibility is reported (one error listing all), not only the first.
    assert "$report.Incompatibilities | ForEach-Object" in text and "-join" in text
    assert "AutomaticStopAction Save" in render("save")["prepare.ps1"]
    assert "AutomaticStopAction TurnOff" in render("off")["prepare.ps1"]


def test_both_hosts_check_the_switch_not_run_on_hyperv() -> None:
    for node in (0, 1):
        text = render(node=node)["prepare.ps1"]
        assert "Get-VMSwitch -Name $VmSwitch" in text
        assert f"missing on hv{node + 1}" in text
    assert "$VmSwitch = ''" in render(switch=None)["env.ps1"]


def test_start_not_run_on_hyperv() -> None:
    assert cmdlets(render()["start_prim.ps1"]) == [
        "Get-VM -Name -ErrorAction",
        "Resume-VM -VM",                 # Paused
        "Start-VM -VM",                  # Saved: restore ...
        "Remove-VMSavedState -VM",       # ... or discard a state the CPU here cannot restore
        "Start-VM -VM",
        "Start-VM -VM",                  # Off
    ]
    assert "& (Join-Path $PSScriptRoot 'prepare.ps1')" in render()["start_prim.ps1"]


@pytest.mark.parametrize(("mode", "graceful"), [
    ("shutdown", ["Stop-VM -VM -Force -AsJob", "Wait-Job -Timeout", "Stop-Job", "Remove-Job -Force",
                  "Remove-Job -Force", "Remove-Job -Force", "Get-VM -Name"]),
    ("save", ["Stop-VM -VM -Save -AsJob", "Wait-Job -Timeout", "Stop-Job", "Remove-Job -Force",
              "Remove-Job -Force", "Remove-Job -Force", "Get-VM -Name"]),
    ("off", ["Stop-VM -VM -TurnOff -Force"]),
])
def test_stop_cmdlets_per_mode_not_run_on_hyperv(mode: str, graceful: list[str]) -> None:
    text = render(mode)["stop_prim.ps1"]
    assert cmdlets(text) == ["Get-VM -Name -ErrorAction",
                             "Stop-VM -VM -TurnOff -Force",  # $Mode force: the last resort
                             *graceful]
    assert "param([ValidateSet('graceful', 'force')][string]$Mode = 'graceful')" in text
    if mode != "off":
        # The wait ends before the agent's own timeout (5m) so the script reports it.
        assert "$GracefulTimeout = 300" in render(mode)["env.ps1"]
        assert "Wait-Job $job -Timeout ([Math]::Max(1, $GracefulTimeout - 1))" in text


def test_status_uses_the_heartbeat_by_id_not_run_on_hyperv() -> None:
    text = render()["status.ps1"]
    assert cmdlets(text) == ["Get-VM -Name -ErrorAction", "Get-VMIntegrationService -VM"]
    assert "$HeartbeatId = '84EAAE65-2F2E-45F5-9BB5-0E857DC8EB47'" in render()["env.ps1"]
    assert "-notin @(2, 12)" in text  # OK or not yet in contact; lost communication fails
    assert "'Heartbeat'" not in text, "integration service names are localized"


def test_values_are_powershell_quoted() -> None:
    env = render(vm="it's")["env.ps1"]
    assert "$VmName = 'it''s'" in env
    assert "$VmDir = 'D:\\Hyper-V\\ERP-01'" in env


def test_the_bracket_check_can_fail() -> None:
    assert balanced("if ($a) { 'x)' } # )")
    assert not balanced("if ($a) { \"}\" ")
