"""Witness arbitration without sockets: the Arbiter's rules (every mode x every holder situation,
in and out of the start-up grace), the payload codec and its 1024-module budget, the node-side
lease arithmetic (belief always ends a margin before the witness's lease), LeaseTable, ICMP echo
parsing, and the `hvha witness` option checks that must refuse before anything runs."""

from __future__ import annotations

import logging
import math
import os
import socket
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import hvha.cli.main as cli_main
from hvha.agent.frames import MAX_PAYLOAD_SIZE, U64_MAX
from hvha.agent.witness import (
    Arbiter,
    Claim,
    Grant,
    Mode,
    encode_reply,
    encode_request,
    fits_one_frame,
    make_claims,
    parse_reply,
    parse_request,
    split_claims,
)
from hvha.agent.witness_client import (
    LeaseTable,
    LeaseView,
    PingWitness,
    WitnessClient,
    lease_valid_until,
)
from hvha.drivers.icmp import echo_request, is_echo_reply

L = 1.0  # lease; margin 0.2, grace 1.2
NONCE = "0123456789abcdef" * 2


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# -- the rules, exhaustively ---------------------------------------------------------------

# situation -> (who takes the lease, when, with which mode), then the time of the claim.
# Grace ends at 1.2; a lease taken at time x expires at x + 1.
SITUATIONS = {
    # name: (setup or None, claim time in grace, claim time after grace)
    "free": (None, 0.5, 2.5),
    "self_live": ("node1", 0.5, 2.5),
    "other_live": ("node2", 0.5, 2.5),
    "self_expired": ("node1", 1.1, 3.1),
    "other_expired": ("node2", 1.1, 3.1),
}
G, D = True, False
# (mode, situation) -> (granted in grace, holder after in grace, granted after grace, holder after)
EXPECTED = {
    ("acquire", "free"): (D, None, G, "node1"),
    ("acquire", "self_live"): (D, "node1", G, "node1"),
    ("acquire", "other_live"): (D, "node2", D, "node2"),
    ("acquire", "self_expired"): (D, None, G, "node1"),
    ("acquire", "other_expired"): (D, None, G, "node1"),
    ("renew", "free"): (G, "node1", G, "node1"),
    ("renew", "self_live"): (G, "node1", G, "node1"),
    ("renew", "other_live"): (D, "node2", D, "node2"),
    ("renew", "self_expired"): (G, "node1", G, "node1"),
    ("renew", "other_expired"): (G, "node1", G, "node1"),
    ("release", "free"): (D, None, D, None),
    ("release", "self_live"): (D, None, D, None),
    ("release", "other_live"): (D, "node2", D, "node2"),
    ("release", "self_expired"): (D, None, D, None),
    ("release", "other_expired"): (D, None, D, None),
}


def arbiter_in(situation: str, grace: bool) -> tuple[Arbiter, FakeClock, float]:
    clock = FakeClock(0.0)
    arbiter = Arbiter(L, clock)
    holder, t_grace, t_after = SITUATIONS[situation]
    t = t_grace if grace else t_after
    if holder is not None:
        taken_at = 0.0 if grace else 2.0  # renew is the only grant possible in grace
        mode = "renew" if grace else "acquire"
        assert arbiter.handle(holder, [("m", mode)], taken_at)["m"].granted
    clock.t = t
    assert arbiter.in_grace() is grace
    return arbiter, clock, t


@pytest.mark.parametrize("grace", [True, False], ids=["in_grace", "after_grace"])
@pytest.mark.parametrize(("mode", "situation"), sorted(EXPECTED))
def test_every_mode_in_every_situation(mode: str, situation: str, grace: bool) -> None:
    arbiter, _, t = arbiter_in(situation, grace)
    want_in, holder_in, want_after, holder_after = EXPECTED[(mode, situation)]
    granted, holder = (want_in, holder_in) if grace else (want_after, holder_after)

    grant = arbiter.handle("node1", [("m", mode)], t)["m"]

    assert grant.granted is granted
    assert grant.holder == holder
    after = arbiter.holder("m", t)
    assert after.holder == holder and after.granted is (holder is not None)
    if granted:
        assert grant.ttl == pytest.approx(L)  # a fresh lease from the receipt time
    elif holder is not None:
        assert 0 < grant.ttl <= L  # what is left of the holder's lease
    else:
        assert grant.ttl == 0.0


def test_grace_ends_exactly_at_lease_plus_margin_and_expiry_is_exclusive() -> None:
    clock = FakeClock(10.0)
    arbiter = Arbiter(L, clock)
    assert arbiter.grace == pytest.approx(1.2) and arbiter.margin == pytest.approx(0.2)
    assert not arbiter.handle("node1", [("m", "acquire")], 11.19)["m"].granted
    assert arbiter.handle("node1", [("m", "acquire")], 11.2)["m"].granted
    assert arbiter.holder("m", 12.19).holder == "node1"
    # expires at 12.2 exactly: the other node gets it then, not a moment before
    assert not arbiter.handle("node2", [("m", "acquire")], 12.199)["m"].granted
    assert arbiter.handle("node2", [("m", "acquire")], 12.2)["m"] == Grant(True, "node2", L)


def test_renewals_extend_from_receipt_and_a_silent_holder_loses_the_module() -> None:
    arbiter = Arbiter(L, FakeClock(0.0))
    t = 5.0
    assert arbiter.handle("node1", [("m", "acquire")], t)["m"].granted
    for _ in range(10):  # renew every L/3: never lost
        t += L / 3
        assert arbiter.handle("node1", [("m", "renew")], t)["m"].granted
        denied = Grant(False, "node1", pytest.approx(L))
        assert arbiter.handle("node2", [("m", "acquire")], t)["m"] == denied
    last = t
    assert not arbiter.handle("node2", [("m", "acquire")], last + L - 1e-6)["m"].granted
    assert arbiter.handle("node2", [("m", "acquire")], last + L)["m"].granted
    assert not arbiter.handle("node1", [("m", "renew")], last + L + 0.1)["m"].granted


def test_one_request_carries_independent_claims_for_many_modules() -> None:
    arbiter = Arbiter(L, FakeClock(0.0))
    arbiter.handle("node2", [("b", "acquire"), ("c", "acquire")], 2.0)
    out = arbiter.handle("node1", [("a", "acquire"), ("b", "renew"), ("c", "release")], 2.5)
    assert out["a"].granted and out["a"].holder == "node1"
    assert out["b"] == Grant(False, "node2", pytest.approx(0.5))
    assert out["c"] == Grant(False, "node2", pytest.approx(0.5))  # not ours to release
    assert arbiter.handle("node2", [("c", "release")], 2.6)["c"] == Grant(False, None, 0.0)
    assert arbiter.handle("node1", [("c", "acquire")], 2.6)["c"].granted


def test_sweep_and_logging(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock(0.0)
    arbiter = Arbiter(L, clock)
    caplog.set_level(logging.DEBUG, logger="hvha.agent.witness")
    arbiter.handle("node1", [("m", "acquire")], 0.1)  # denied: grace
    arbiter.handle("node1", [("m", "acquire")], 2.0)
    arbiter.handle("node1", [("m", "renew")], 2.3)
    for t in (2.4, 2.5, 2.6):  # a waiting node asks again and again: logged once
        arbiter.handle("node2", [("m", "acquire")], t)
        arbiter.handle("node1", [("m", "renew")], t)  # renewals are DEBUG
    assert arbiter.sweep(3.5) == []
    assert arbiter.sweep(3.6) == ["m"]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert infos == [
        "module m: acquire denied to node1 (start-up grace, 1.100s left)",
        "module m: acquire granted to node1 for 1s",
        "module m: acquire denied to node2 (held by node1 for 0.900s)",
        "module m: lease of node1 expired",
    ]
    assert arbiter.snapshot(3.6) == {"lease": L, "grace_left": 0.0, "leases": {}}
    arbiter.handle("node2", [("m", "acquire")], 3.7)
    arbiter.handle("node1", [("m", "acquire")], 3.8)  # a new holder: denials logged again
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO][4:]
    assert infos == ["module m: acquire granted to node2 for 1s",
                     "module m: acquire denied to node1 (held by node2 for 0.900s)"]


def test_arbiter_rejects_bad_leases_and_modes() -> None:
    for lease in (0.0, -1.0, math.inf, math.nan, 1e9):
        with pytest.raises(ValueError):
            Arbiter(lease, FakeClock())
    with pytest.raises(ValueError):
        Arbiter(L, FakeClock()).handle("node1", [("m", "steal")])


# -- payload codec -------------------------------------------------------------------------


def test_request_and_reply_round_trip() -> None:
    claims = make_claims([("web", "acquire"), ("db", "renew"), ("old", "release")])
    payload = encode_request(NONCE, claims)
    assert payload == (
        b'{"nonce":"' + NONCE.encode() + b'","claims":[{"module":"web","mode":"acquire"},'
        b'{"module":"db","mode":"renew"},{"module":"old","mode":"release"}]}'
    )
    assert parse_request(payload) == (NONCE, claims)
    grants = {"web": Grant(True, "node1", 5.0), "db": Grant(False, None, 0.0),
              "old": Grant(False, "node2", 1.2345678)}
    reply = encode_reply(NONCE, grants)
    assert reply == (
        b'{"nonce":"' + NONCE.encode() + b'","grants":{"web":{"granted":true,"holder":"node1",'
        b'"ttl_ms":5000},"db":{"granted":false,"holder":null,"ttl_ms":0},"old":{"granted":false,'
        b'"holder":"node2","ttl_ms":1234}}}'
    )
    assert parse_reply(reply) == (NONCE, {**grants, "old": Grant(False, "node2", 1.234)})


@pytest.mark.parametrize(
    "payload",
    [
        b"", b"[]", b"{", b'{"nonce":"zz","claims":[{"module":"m","mode":"renew"}]}',
        b'{"nonce":"' + NONCE.upper().encode() + b'","claims":[{"module":"m","mode":"renew"}]}',
        b'{"nonce":"' + NONCE.encode() + b'","claims":[]}',
        b'{"nonce":"' + NONCE.encode() + b'","claims":[{"module":"m","mode":"steal"}]}',
        b'{"nonce":"' + NONCE.encode() + b'","claims":[{"module":"1m","mode":"renew"}]}',
        b'{"nonce":"' + NONCE.encode() + b'","claims":[{"module":"m"}]}',
        b'{"nonce":"' + NONCE.encode() + b'","claims":["m"]}',
        b'{"nonce":"' + NONCE.encode() + b'","claims":[{"module":"m","mode":"renew"},'
        b'{"module":"m","mode":"release"}]}',
        b"[" * 100_000,
    ],
)
def test_malformed_requests_are_value_errors(payload: bytes) -> None:
    with pytest.raises(ValueError):
        parse_request(payload)


@pytest.mark.parametrize(
    "grant",
    [
        b'{"granted":1,"holder":null,"ttl_ms":0}', b'{"granted":true,"holder":"a b","ttl_ms":0}',
        b'{"granted":true,"holder":null,"ttl_ms":-1}',
        b'{"granted":true,"holder":null,"ttl_ms":true}',
        b'{"granted":true,"holder":null,"ttl_ms":1.5}', b'{"granted":true,"holder":null}', b"[]",
    ],
)
def test_malformed_replies_are_value_errors(grant: bytes) -> None:
    with pytest.raises(ValueError):
        parse_reply(b'{"nonce":"' + NONCE.encode() + b'","grants":{"m":' + grant + b"}}")


@pytest.mark.parametrize(("name_length", "max_chunks"), [(5, 3), (11, 3), (63, 4)])
def test_1024_modules_are_split_so_that_every_request_and_reply_fits(
    name_length: int, max_chunks: int
) -> None:
    claims = [Claim(f"m{i:04d}".ljust(name_length, "x"), Mode.ACQUIRE) for i in range(1024)]
    chunks = split_claims(claims)
    assert [c for chunk in chunks for c in chunk] == claims
    worst = Grant(False, "h" * 63, U64_MAX / 1000)
    for chunk in chunks:
        assert fits_one_frame(chunk)
        assert len(encode_request(NONCE, chunk)) <= MAX_PAYLOAD_SIZE
        assert len(encode_reply(NONCE, {c.module: worst for c in chunk})) <= MAX_PAYLOAD_SIZE
    assert len(chunks) <= max_chunks
    assert not fits_one_frame(claims)


# -- node-side lease arithmetic ------------------------------------------------------------

rate = st.floats(-4.9e-4, 4.9e-4)  # |node rate - witness rate| <= 1e-3 = ε


@given(
    node_lease=st.floats(0.3, 120), witness_lease=st.floats(0.3, 120),
    request_delay=st.floats(0, 30), node_rate=rate, witness_rate=rate,
    node_origin=st.floats(0, 1e6), witness_origin=st.floats(0, 1e6),
)
def test_node_belief_ends_a_margin_before_the_witness_lease(
    node_lease: float, witness_lease: float, request_delay: float, node_rate: float,
    witness_rate: float, node_origin: float, witness_origin: float,
) -> None:
    """Real time 0: the node reads its clock and sends; the witness receives at any delay >= 0
    (timestamps in real seconds; each host's monotonic clock runs at its own rate)."""
    def node_clock(t: float) -> float:
        return node_origin + t * (1 + node_rate)

    def witness_clock(t: float) -> float:
        return witness_origin + t * (1 + witness_rate)

    arbiter = Arbiter(witness_lease, lambda: witness_origin - 1000.0)
    received = witness_clock(request_delay)
    grant = arbiter.handle("node1", [("m", "acquire")], received)["m"]
    assert grant.granted
    # the ttl crosses the wire in whole milliseconds
    ttl = parse_reply(encode_reply(NONCE, {"m": grant}))[1]["m"].ttl
    belief_end = lease_valid_until(node_clock(0.0), ttl, node_lease)
    belief_end_real = (belief_end - node_origin) / (1 + node_rate)
    witness_end_real = (received + witness_lease - witness_origin) / (1 + witness_rate)
    margin = node_lease / 5
    assert witness_end_real - belief_end_real >= margin / (1 + node_rate) - 1e-6


def test_valid_until_formula() -> None:
    assert lease_valid_until(100.0, 5.0, 5.0) == pytest.approx(100 + 5 * 0.999 - 1)
    assert lease_valid_until(100.0, 60.0, 5.0) == pytest.approx(100 + 5 * 0.999 - 1)  # min
    assert lease_valid_until(100.0, 2.0, 5.0) == pytest.approx(100 + 2 * 0.999 - 1)


def view(granted: bool, sent_at: float, until: float) -> LeaseView:
    return LeaseView(granted, "node1" if granted else None, 1.0, sent_at, until)


def test_lease_table_keeps_the_newest_answer_and_revokes() -> None:
    table = LeaseTable()
    assert not table.valid("m", 0.0) and table.valid_until("m") == -math.inf
    table.update({"m": view(True, 10.0, 14.0), "n": view(False, 10.0, -math.inf)})
    assert table.valid("m", 13.99) and not table.valid("m", 14.0)
    assert not table.valid("n", 10.0)
    assert table.valid_modules(12.0) == ["m"]
    table.update({"m": view(True, 9.0, 13.0)})  # an older request answered late: ignored
    assert table.valid_until("m") == 14.0
    table.update({"m": view(False, 11.0, -math.inf)})  # a newer denial wins at once
    assert not table.valid("m", 12.0)
    table.update({"m": view(True, 12.0, 16.0)})
    table.revoke("m")  # before sending a release
    assert not table.valid("m", 12.5)
    table.revoke("never-seen")


def test_client_checks_its_arguments() -> None:
    with pytest.raises(ValueError):
        WitnessClient("lab", "node 1", b"s", "127.0.0.1", 4801, 1.0)
    with pytest.raises(ValueError):
        WitnessClient("lab", "node1", b"s", "witness.example", 4801, 1.0)  # literals only
    with pytest.raises(ValueError):
        WitnessClient("lab", "node1", b"", "127.0.0.1", 4801, 1.0)
    client = WitnessClient("lab", "node1", b"s", "127.0.0.1", 4801, 0.6)
    assert client.timeout == pytest.approx(0.2)
    assert WitnessClient("lab", "node1", b"s", "::1", 4801, 6.0).timeout == 1.0


# -- ICMP echo -----------------------------------------------------------------------------


def test_echo_packets() -> None:
    token = os.urandom(16)
    request = echo_request(socket.AF_INET, 0x1234, 7, token)
    assert request[0] == 8 and len(request) == 24
    s = sum(struct.unpack("!12H", request))
    assert (s & 0xFFFF) + (s >> 16) == 0xFFFF  # valid internet checksum
    reply = bytes([0]) + request[1:]
    ip_header = bytes([0x45]) + bytes(19)
    assert is_echo_reply(socket.AF_INET, reply, token, None, raw=False)
    assert is_echo_reply(socket.AF_INET, ip_header + reply, token, 0x1234, raw=True)
    assert not is_echo_reply(socket.AF_INET, ip_header + reply, token, 0x4321, raw=True)
    assert not is_echo_reply(socket.AF_INET, ip_header + request, token, 0x1234, raw=True)
    assert not is_echo_reply(socket.AF_INET, reply, os.urandom(16), None, raw=False)
    assert not is_echo_reply(socket.AF_INET, b"\x45", token, None, raw=True)
    v6 = echo_request(socket.AF_INET6, 1, 1, token)
    assert v6[0] == 128
    assert is_echo_reply(socket.AF_INET6, bytes([129]) + v6[1:], token, 1, raw=True)
    with pytest.raises(ValueError):
        PingWitness([])
    with pytest.raises(ValueError):
        PingWitness(["gateway.example"])


# -- `hvha witness` refusals ----------------------------------------------------------------


def run_cli(monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    if "witness" not in cli_main.COMMAND_MODULES:
        monkeypatch.setattr(cli_main, "COMMAND_MODULES", (*cli_main.COMMAND_MODULES, "witness"))
    try:
        return cli_main.main(["witness", *argv])
    except SystemExit as exc:  # argparse errors
        return int(exc.code or 0)


SECRET = b"correct horse battery staple"


@pytest.mark.parametrize(
    ("mode", "content", "extra", "message"),
    [
        (0o644, SECRET, [], "(mode 0644): run `chmod 600"),
        (0o640, SECRET, [], "(mode 0640): run `chmod 600"),
        (0o600, b"\n", [], "is empty"),
        (0o600, SECRET, ["--lease", "5"], "not a duration"),
        (0o600, SECRET, ["--lease", "100ms"], "between 0.3s and 3600s"),
        (0o600, SECRET, ["--port", "70000"], "--port must be 1..65535"),
        (0o600, SECRET, ["--listen", "witness.example"], "not an IP address"),
        (0o600, SECRET, ["--cluster", "Lab"], "--cluster 'Lab'"),
    ],
)
def test_cli_refuses_with_a_clear_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    mode: int, content: bytes, extra: list[str], message: str,
) -> None:
    key = tmp_path / "cluster.key"
    key.write_bytes(content)
    key.chmod(mode)
    code = run_cli(monkeypatch, "--cluster", "lab", "--secret-file", str(key), *extra)
    out, err = capsys.readouterr()
    assert code == 1
    assert message in err and "Traceback" not in err
    assert SECRET.decode() not in out + err


def test_cli_secret_sources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "cluster.key"
    key.write_bytes(SECRET)
    key.chmod(0o600)
    both = ["--secret-file", str(key), "--secret-env", "HVHA_KEY"]
    assert run_cli(monkeypatch, "--cluster", "lab", *both) == 1
    assert "not allowed with argument" in capsys.readouterr().err
    assert run_cli(monkeypatch, "--cluster", "lab") == 1  # neither
    assert "one of the arguments --secret-file --secret-env is required" in capsys.readouterr().err
    monkeypatch.delenv("HVHA_KEY", raising=False)
    assert run_cli(monkeypatch, "--cluster", "lab", "--secret-env", "HVHA_KEY") == 1
    assert "HVHA_KEY is not set" in capsys.readouterr().err
    monkeypatch.setenv("HVHA_KEY", "")
    assert run_cli(monkeypatch, "--cluster", "lab", "--secret-env", "HVHA_KEY") == 1
    assert "HVHA_KEY is empty" in capsys.readouterr().err
    missing = tmp_path / "missing.key"
    assert run_cli(monkeypatch, "--cluster", "lab", "--secret-file", str(missing)) == 1
    assert "does not exist" in capsys.readouterr().err
    assert run_cli(monkeypatch, "--cluster", "lab", "--secret-file", str(tmp_path)) == 1
    assert "not a regular file" in capsys.readouterr().err  # a directory
