"""The rendered kvm module scripts, run for real against fakes on PATH.

* Plain QEMU: the disk cache policy of start_prim.sh (refusals, and the O_DIRECT probe picking
  none/directsync or their fallbacks) with a fake ``qemu-system-x86_64`` that records its argv,
  and a fake ``dd`` failing O_DIRECT writes for a file system that refuses them; the real QEMU
  on real FUSE passthroughs (with and without O_DIRECT) is in
  tests/integration/test_kvm_guest.py.
* libvirt: NOT RUN ON LIBVIRT. libvirtd is not run in this lab (Debian's libvirt-daemon-system
  pulls in systemd as init), so these are golden tests of the exact ``virsh`` commands each
  script issues, with a fake ``virsh`` that logs its arguments and plays the domain state.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from hvha.compile.render import render_module
from hvha.config.validate import validate_bytes

BASE = {
    "cluster": {"name": "kt", "secret": {"file": "/nonexistent/key"}},
    "nodes": [{"name": "n1", "address": "127.0.0.1", "transport": {"type": "local"}},
              {"name": "n2", "address": "127.0.0.2", "transport": {"type": "local"}}],
    "heartbeat": {"interval": "500ms", "timeout": "3s",
                  "networks": [{"name": "lan", "subnet": "127.0.0.0/8"}]},
    "witness": {"arbiter": {"address": "127.0.0.3"}},
}


def render(tmp_path: Path, payload: dict[str, object], stop: dict[str, object] | None = None,
           name: str = "vm") -> Path:
    """Render module ``name`` for node n1 into tmp_path/name; returns that directory."""
    module = {"name": name, "kind": "kvm", "payload": payload,
              "stop": stop or {"mode": "shutdown", "graceful_timeout": "3s"}}
    v = validate_bytes(yaml.safe_dump({**BASE, "modules": [module]}).encode(), "t.yaml")
    assert v.cluster is not None, [d.render() for d in v.report]
    out = tmp_path / name
    out.mkdir()
    for fname, (text, mode) in render_module(v.cluster, v.cluster.modules[0],
                                             v.cluster.nodes[0]).items():
        (out / fname).write_text(text)
        (out / fname).chmod(mode)
    return out


def fake_bin(tmp_path: Path, name: str, body: str) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    path = bindir / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return bindir


def run(script: Path, *args: str, bindir: Path | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    path = f"{bindir}:{os.environ['PATH']}" if bindir else os.environ["PATH"]
    return subprocess.run(["/bin/sh", str(script), *args], capture_output=True, text=True,
                          timeout=30, check=False,
                          env={**os.environ, "PATH": path, "HVHA_PYTHON": sys.executable,
                               **(env or {})})


# ---- plain QEMU: disk cache policy -------------------------------------------------------

QEMU = "qemu-system-x86_64"


def qemu_payload(vm_dir: Path, *args: str) -> dict[str, object]:
    return {"vm": "tiny", "directory": str(vm_dir), "hypervisor": "qemu",
            "command": [QEMU, "-m", "64", *args]}


@pytest.mark.parametrize(("args", "why"), [
    (["-drive", "file=/d/x.img,format=raw,cache=unsafe"], "cache=unsafe ignores guest flushes"),
    (["-drive", "file=/d/x.img,cache.no-flush=on"], "cache.no-flush=on"),
    (["-drive", "file=/d/x.img,snapshot=on"], "snapshot=on never writes"),
    (["-snapshot", "-drive", "file=/d/x.img"], "-snapshot never writes"),
    (["-blockdev", '{"driver":"file","filename":"/d/x","cache":{"no-flush": true}}'],
     "no-flush ignores guest flushes"),
])
def test_unsafe_disk_options_are_refused_before_qemu_runs(tmp_path: Path, args: list[str],
                                                          why: str) -> None:
    bindir = fake_bin(tmp_path, QEMU, f"touch {tmp_path}/qemu-ran\n")
    script = render(tmp_path, qemu_payload(tmp_path, *args)) / "start_prim.sh"
    res = run(script, bindir=bindir)
    assert res.returncode == 2
    assert why in res.stderr and "refusing to start VM tiny" in res.stderr
    assert not (tmp_path / "qemu-ran").exists()


NO_O_DIRECT_DD = 'for a; do [ "$a" = oflag=direct ] && exit 1; done\nexec dd "$@"\n'


def _started_argv(tmp_path: Path, vm_dir: Path, drive: str,
                  o_direct: bool) -> tuple[list[str], str]:
    """argv the start script gives QEMU (the fake records it, then fails) and its stderr.
    Without ``o_direct`` a fake ``dd`` fails every O_DIRECT write, as a FUSE mirror may."""
    record = tmp_path / "argv"
    bindir = fake_bin(tmp_path, QEMU, f'printf "%s\\n" "$@" > {record}\nexit 1\n')
    (bindir / "dd").unlink(missing_ok=True)
    if not o_direct:
        fake_bin(tmp_path, "dd", NO_O_DIRECT_DD.replace("exec dd", f"exec {_real_dd()}"))
    shutil.rmtree(tmp_path / "m", ignore_errors=True)
    script = render(tmp_path, qemu_payload(vm_dir, "-drive", drive), name="m") / "start_prim.sh"
    res = run(script, bindir=bindir)
    assert res.returncode != 0  # the fake QEMU fails on purpose
    return record.read_text().splitlines(), res.stderr


def _real_dd() -> str:
    found = shutil.which("dd")
    assert found is not None
    return found


def _drive(argv: list[str]) -> str:
    return argv[argv.index("-drive") + 1]


@pytest.fixture
def runtime_dir() -> Iterator[None]:
    if os.geteuid() != 0:
        pytest.skip("start_prim.sh creates /run/hvha/...: run as root")
    yield
    shutil.rmtree("/run/hvha/kt", ignore_errors=True)


@pytest.mark.usefixtures("runtime_dir")
@pytest.mark.parametrize(("given", "direct", "fallback"), [
    ("", "cache=none", "cache=writeback"),
    (",cache=none", "cache=none", "cache=writeback"),
    (",cache=directsync", "cache=directsync", "cache=writethrough"),
    (",cache=writeback", "cache=writeback", "cache=writeback"),
    (",cache=writethrough", "cache=writethrough", "cache=writethrough"),
    (",cache=none,aio=threads", "cache=none,aio=threads", "cache=writeback,aio=threads"),
])
def test_cache_mode_follows_o_direct_support(tmp_path: Path, given: str, direct: str,
                                             fallback: str) -> None:
    vm_dir = tmp_path / "vm"
    vm_dir.mkdir()
    drive = f"file={vm_dir}/d.img,format=raw,if=virtio{given}"
    argv, err = _started_argv(tmp_path, vm_dir, drive, o_direct=True)
    assert _drive(argv) == f"file={vm_dir}/d.img,format=raw,if=virtio,{direct}"
    assert "refuses O_DIRECT" not in err
    assert argv[-5:] == ["-qmp", "unix:/run/hvha/kt/m/qmp.sock,server=on,wait=off",
                         "-pidfile", "/run/hvha/kt/m/payload.pid", "-daemonize"]
    assert list(vm_dir.iterdir()) == [], "the O_DIRECT probe file must be removed"

    argv, err = _started_argv(tmp_path, vm_dir, drive, o_direct=False)
    assert _drive(argv) == f"file={vm_dir}/d.img,format=raw,if=virtio,{fallback}"
    if direct.split(",")[0] != fallback.split(",")[0]:
        assert f"refuses O_DIRECT: {vm_dir}/d.img runs with {fallback.split(',')[0]}" in err


@pytest.mark.usefixtures("runtime_dir")
def test_aio_native_without_o_direct_fails_with_a_hint(tmp_path: Path) -> None:
    record = tmp_path / "argv"
    bindir = fake_bin(tmp_path, QEMU, f'printf "%s\\n" "$@" > {record}\n')
    fake_bin(tmp_path, "dd", NO_O_DIRECT_DD.replace("exec dd", f"exec {_real_dd()}"))
    script = render(tmp_path, qemu_payload(
        tmp_path, "-drive", f"file={tmp_path}/d.img,cache=none,aio=native")) / "start_prim.sh"
    res = run(script, bindir=bindir)
    assert res.returncode != 0 and "use aio=threads" in res.stderr
    assert not record.exists(), "QEMU must not be started"


def test_nographic_becomes_display_none_and_args_stay_quoted(tmp_path: Path) -> None:
    text = (render(tmp_path, qemu_payload(
        tmp_path, "-nographic", "-append", "console=ttyS0 x='1'",
        "-drive", "file=/v/a,,b.img,cache=none")) / "start_prim.sh").read_text()
    qemu_line = next(line for line in text.splitlines() if line.startswith(QEMU))
    assert " -display none " in qemu_line and "-nographic" not in qemu_line
    assert """-append 'console=ttyS0 x='"'"'1'"'"''""" in qemu_line
    # ",," is an escaped comma inside the file name: kept in the option, unescaped for the probe.
    assert ' file=/v/a,,b.img,cache="$hvha_cache_1" ' in qemu_line + " "
    assert "hvha_cache_1=$(hvha_cache none /v/a,b.img 0)" in text


# ---- libvirt: golden tests of the virsh commands (NOT RUN ON LIBVIRT) -------------------

VIRSH = r"""
echo "virsh $*" >> "$VIRSH_LOG"
state=$(cat "$VIRSH_STATE")
case "$1" in
  domstate) echo "$state" ;;
  start) echo running > "$VIRSH_STATE" ;;
  shutdown) [ "${VIRSH_IGNORE_SHUTDOWN:-0}" = 1 ] || echo "shut off" > "$VIRSH_STATE" ;;
  destroy|managedsave) echo "shut off" > "$VIRSH_STATE" ;;
esac
"""


Libvirt = tuple[Path, Path, Path, dict[str, str]]  # VM dir, fake bin dir, virsh log, env


@pytest.fixture
def libvirt(tmp_path: Path) -> Libvirt:
    vm_dir = tmp_path / "db01"
    vm_dir.mkdir()
    (vm_dir / "db01.xml").write_text("<domain type='kvm'><name>db01</name>"
                                     "<devices><disk><driver cache='none'/></disk></devices>"
                                     "</domain>")
    log, state = tmp_path / "virsh.log", tmp_path / "state"
    state.write_text("shut off\n")
    bindir = fake_bin(tmp_path, "virsh", VIRSH)
    return vm_dir, bindir, log, {"VIRSH_LOG": str(log), "VIRSH_STATE": str(state)}


def _virsh_calls(log: Path) -> list[str]:
    calls = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return calls


def test_libvirt_commands_not_run_on_libvirt(tmp_path: Path, libvirt: Libvirt) -> None:
    vm_dir, bindir, log, env = libvirt
    scripts = render(tmp_path, {"vm": "db01", "directory": str(vm_dir)})
    xml = f"{vm_dir}/db01.xml"

    assert run(scripts / "prepare.sh", bindir=bindir, env=env).returncode == 0
    assert _virsh_calls(log) == [f"virsh define {xml}", "virsh autostart --disable db01"]

    assert run(scripts / "status.sh", bindir=bindir, env=env).returncode == 1
    assert _virsh_calls(log) == ["virsh domstate db01"]

    assert run(scripts / "start_prim.sh", bindir=bindir, env=env).returncode == 0
    assert _virsh_calls(log) == [f"virsh define {xml}", "virsh autostart --disable db01",
                                 "virsh domstate db01", "virsh start db01"]
    assert run(scripts / "start_prim.sh", bindir=bindir, env=env).returncode == 0
    assert _virsh_calls(log)[-1] == "virsh domstate db01", "running: no second start"

    assert run(scripts / "status.sh", bindir=bindir, env=env).returncode == 0
    _virsh_calls(log)

    assert run(scripts / "stop_prim.sh", "graceful", bindir=bindir, env=env).returncode == 0
    assert _virsh_calls(log) == ["virsh domstate db01", "virsh shutdown db01",
                                 "virsh domstate db01", "virsh domstate db01"]
    assert run(scripts / "stop_prim.sh", "force", bindir=bindir, env=env).returncode == 0
    assert _virsh_calls(log) == ["virsh domstate db01"], "already off: nothing to destroy"


def test_libvirt_graceful_timeout_then_force_not_run_on_libvirt(tmp_path: Path,
                                                                 libvirt: Libvirt) -> None:
    vm_dir, bindir, log, env = libvirt
    env = {**env, "VIRSH_IGNORE_SHUTDOWN": "1"}
    Path(env["VIRSH_STATE"]).write_text("running\n")
    scripts = render(tmp_path, {"vm": "db01", "directory": str(vm_dir)},
                     stop={"mode": "shutdown", "graceful_timeout": "2s"})
    assert run(scripts / "stop_prim.sh", "graceful", bindir=bindir, env=env).returncode == 1
    calls = _virsh_calls(log)
    assert calls[:2] == ["virsh domstate db01", "virsh shutdown db01"]
    assert set(calls[2:]) == {"virsh domstate db01"} and len(calls) >= 3
    assert run(scripts / "stop_prim.sh", "force", bindir=bindir, env=env).returncode == 0
    assert _virsh_calls(log) == ["virsh domstate db01", "virsh destroy db01"]


@pytest.mark.parametrize(("mode", "command"), [("save", "virsh managedsave db01"),
                                               ("off", "virsh destroy db01")])
def test_libvirt_stop_modes_not_run_on_libvirt(tmp_path: Path, libvirt: Libvirt, mode: str,
                                               command: str) -> None:
    vm_dir, bindir, log, env = libvirt
    Path(env["VIRSH_STATE"]).write_text("running\n")
    scripts = render(tmp_path, {"vm": "db01", "directory": str(vm_dir)},
                     stop={"mode": mode, "graceful_timeout": "2s"})
    assert run(scripts / "stop_prim.sh", "graceful", bindir=bindir, env=env).returncode == 0
    assert _virsh_calls(log) == ["virsh domstate db01", command]


def test_libvirt_unsafe_cache_in_domain_xml_is_refused(tmp_path: Path, libvirt: Libvirt) -> None:
    vm_dir, bindir, log, env = libvirt
    (vm_dir / "db01.xml").write_text("<domain><devices><disk><driver name='qemu' "
                                     "cache='unsafe'/></disk></devices></domain>")
    scripts = render(tmp_path, {"vm": "db01", "directory": str(vm_dir)})
    res = run(scripts / "start_prim.sh", bindir=bindir, env=env)
    assert res.returncode == 2 and "cache='unsafe'" in res.stderr
    assert _virsh_calls(log) == []
