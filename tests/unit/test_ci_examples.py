"""The pipeline samples in examples/ci/ must keep working as the CLI changes.

Every `hvha` command line in their shell steps is parsed with hvha's own argument parser, the
GitOps commands each pipeline promises are checked to be there, and the steps whose exit-code
handling matters (plan's exit 2 = changes, reconcile's exit 2 = disruptive changes withheld) and
the steps that write secrets to files are run in bash against a stand-in `hvha`.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from hvha.cli.main import build_parser

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "ci"
GITHUB = EXAMPLES / "github-actions.yml"
GITLAB = EXAMPLES / "gitlab-ci.yml"
SECRETS = ("HVHA_SSH_KEY", "HVHA_KNOWN_HOSTS", "HVHA_CLUSTER_KEY")
# tokens after which a word is a command (shell operators and the keywords used in the samples)
COMMAND_START = {";", "&&", "||", "|", "(", "!", "&", "then", "do", "else", "elif", "if",
                 "while", "until"}
ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
PLACEHOLDER = "VALUE"  # a variable's value is unknown here; it still counts as one argument


def _load(path: Path) -> dict[Any, Any]:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict), f"{path} is not a YAML mapping"
    return doc


def _flat(items: Any) -> list[str]:
    """GitLab scripts: a string or a list, lists nested through anchors flattened."""
    if isinstance(items, str):
        return [items]
    return [s for item in items or [] for s in _flat(item)]


def github_scripts() -> dict[str, list[str]]:
    """The `run:` scripts of each job of the GitHub workflow."""
    jobs = _load(GITHUB)["jobs"]
    return {name: [s["run"] for s in job["steps"] if "run" in s] for name, job in jobs.items()}


def gitlab_scripts() -> dict[str, list[str]]:
    """The script lines of each GitLab job (the default before_script included)."""
    doc = _load(GITLAB)
    before = _flat(doc.get("default", {}).get("before_script"))
    return {name: before + _flat(job.get("script"))
            for name, job in doc.items()
            if isinstance(job, dict) and not name.startswith(".") and "script" in job}


def hvha_commands(script: str) -> list[list[str]]:
    """The argv (after `hvha`) of every hvha invocation in a shell script, redirections and
    pipes cut off, variable arguments replaced by a placeholder."""
    found = []
    for line in script.replace("\\\n", " ").splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        tokens = list(lex)
        at_command = True
        for i, tok in enumerate(tokens):
            if at_command and (tok == "hvha" or tok.endswith("/bin/hvha")):
                argv: list[str] = []
                for arg in tokens[i + 1:]:
                    if set(arg) <= set("();<>|&"):
                        if arg[0] in "<>" and argv and argv[-1].isdigit():
                            argv.pop()  # the 2 of 2>&1
                        break
                    argv.append(PLACEHOLDER if arg.startswith("$") else arg)
                found.append(argv)
            at_command = tok in COMMAND_START or (at_command and bool(ASSIGNMENT.match(tok)))
    return found


def parse(argv: list[str]) -> argparse.Namespace:
    """hvha's own parser on ``argv``; AssertionError with its message if it refuses it."""
    try:
        ns: argparse.Namespace = build_parser().parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"`hvha {shlex.join(argv)}` is not a valid hvha command "
                             f"(exit {exc.code})") from None
    assert getattr(ns, "func", None) is not None, f"`hvha {shlex.join(argv)}` names no command"
    return ns


def _all_commands() -> list[tuple[str, str, list[str]]]:
    out = []
    for path, scripts in ((GITHUB, github_scripts()), (GITLAB, gitlab_scripts())):
        for job, texts in scripts.items():
            out += [(path.name, job, argv) for text in texts for argv in hvha_commands(text)]
    return out


@pytest.mark.parametrize(("file", "job", "argv"), _all_commands(),
                         ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_every_hvha_command_is_valid(file: str, job: str, argv: list[str]) -> None:
    parse(argv)


def test_the_checker_finds_and_rejects_bad_commands() -> None:
    assert hvha_commands('rc=0; hvha plan c.yaml -out p.json > plan.txt || rc=$?\n'
                         'echo "hvha plan"; X=1 hvha validate "$F" 2>&1 | tee log') == [
        ["plan", "c.yaml", "-out", "p.json"], ["validate", PLACEHOLDER]]
    for bad in (["plan", "c.yaml", "--no-such-flag"], ["aply", "c.yaml"], ["apply"]):
        with pytest.raises(AssertionError, match="not a valid hvha command"):
            parse(bad)


def _commands(scripts: dict[str, list[str]], job: str) -> list[argparse.Namespace]:
    return [parse(argv) for text in scripts[job] for argv in hvha_commands(text)]


@pytest.mark.parametrize(("scripts", "review", "deploy"),
                         [(github_scripts, "plan", "apply"), (gitlab_scripts, "plan", "apply")])
def test_pipelines_run_the_gitops_commands(scripts: Any, review: str, deploy: str) -> None:
    jobs = scripts()
    on_review = _commands(jobs, review)
    assert [c.command for c in on_review] == ["validate", "plan"]
    assert on_review[1].detailed_exitcode and on_review[1].out == "plan.json"
    on_deploy = _commands(jobs, deploy)
    assert [c.command for c in on_deploy] == ["validate", "plan", "apply"]
    # what is applied is exactly the plan just shown
    assert on_deploy[1].out == on_deploy[2].file == "plan.json"
    assert on_deploy[2].wheelhouse  # a pip-installed hvha cannot build its own wheels
    [reconcile] = _commands(jobs, "reconcile")
    assert reconcile.command == "reconcile" and reconcile.once


# --- the steps run in bash against a stand-in hvha --------------------------------------------


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    """A PATH directory with an `hvha` that exits $FAKE_RC (validate: 0) and a pass-through
    `sudo`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "hvha").write_text('#!/bin/sh\n[ "$1" = validate ] && exit 0\n'
                                  'echo "Plan: 1 to add"\nexit "${FAKE_RC:-0}"\n')
    (bin_dir / "sudo").write_text('#!/bin/sh\nexec "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def _bash(script: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # GitHub runs `bash -e -o pipefail`, GitLab stops at the first failing line: the same here
    return subprocess.run(["bash", "--noprofile", "--norc", "-e", "-o", "pipefail", "-c", script],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=30)


def _env(fake_bin: Path, home: Path, **extra: str) -> dict[str, str]:
    return {"PATH": f"{fake_bin}:{os.environ['PATH']}", "HOME": str(home), **extra}


def _step(job: str, containing: str) -> str:
    return next(s for s in github_scripts()[job] if containing in s)


def _gitlab(job: str) -> str:
    """The job's own hvha lines and the exit-code handling around them (no installs)."""
    return "\n".join(line for line in _flat(_load(GITLAB)[job]["script"])
                     if hvha_commands(line) or line.startswith(("rc=", "if ", "cat ")))


@pytest.mark.parametrize(("rc", "ok"), [(0, True), (2, True), (1, False), (3, False)])
def test_plan_step_exit_2_means_changes_not_failure(rc: int, ok: bool, fake_bin: Path,
                                                    tmp_path: Path) -> None:
    env = _env(fake_bin, tmp_path, FAKE_RC=str(rc))
    for script in (_step("plan", "hvha plan"), _gitlab("plan")):
        res = _bash(script, tmp_path, env)
        assert (res.returncode == 0) is ok, (rc, script, res.stderr)
        assert "Plan: 1 to add" in res.stdout  # the plan is shown in the log either way
        assert (tmp_path / "plan.txt").read_text() == "Plan: 1 to add\n"


@pytest.mark.parametrize("rc", [0, 1, 2])
def test_reconcile_exit_2_is_a_warning(rc: int, fake_bin: Path, tmp_path: Path) -> None:
    env = _env(fake_bin, tmp_path, FAKE_RC=str(rc))
    gh = _bash(_step("reconcile", "hvha reconcile"), tmp_path, env)
    assert gh.returncode == (1 if rc == 1 else 0)
    assert ("::warning::" in gh.stdout) is (rc == 2)
    job = _load(GITLAB)["reconcile"]
    gl = _bash(_gitlab("reconcile"), tmp_path, env)
    assert gl.returncode == rc  # GitLab then decides: exit 2 is allowed, shown as a warning
    assert job["allow_failure"]["exit_codes"] == [2]


def test_secrets_are_written_to_private_files_never_printed(fake_bin: Path,
                                                            tmp_path: Path) -> None:
    values = {name: f"----- {name.lower()} value -----" for name in SECRETS}
    key_file = tmp_path / "etc" / "hvha" / "cluster.key"
    home = tmp_path / "home"
    home.mkdir()
    # GitHub: secrets come in as environment variables of the step, never in the script text
    for job in ("apply", "reconcile"):
        for step in _load(GITHUB)["jobs"][job]["steps"]:
            assert "secrets." not in step.get("run", ""), f"{job}: a secret in a script"
    gh = (_step("apply", "HVHA_CLUSTER_KEY"),
          _env(fake_bin, home, HVHA_CLUSTER_KEY_FILE=str(key_file), **values))
    # GitLab: File variables hold the path of a file with the value
    for name, value in values.items():
        (tmp_path / name).write_text(value + "\n")
    gl = ("\n".join(ln for ln in gitlab_scripts()["apply"] if ln.startswith("install ")),
          _env(fake_bin, home, HVHA_CLUSTER_KEY_FILE=str(key_file),
               **{n: str(tmp_path / n) for n in SECRETS}))
    for script, env in (gh, gl):
        res = _bash(script, tmp_path, env)
        assert res.returncode == 0, res.stderr
        assert not any(v in res.stdout + res.stderr for v in values.values())
        written = {home / ".ssh/hvha_ed25519": "HVHA_SSH_KEY",
                   home / ".ssh/hvha_known_hosts": "HVHA_KNOWN_HOSTS",
                   key_file: "HVHA_CLUSTER_KEY"}
        for path, name in written.items():
            assert path.read_text().strip() == values[name]
            assert path.stat().st_mode & 0o777 == 0o600, path
            path.unlink()
