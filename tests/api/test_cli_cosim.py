"""msctl cosim against a real server process: the README's two-board example end to end
(a topology file, create -f, run with member-prefixed console lines, a breakpoint halting
both members at one virtual instant, status), Ctrl-C pausing a run, and bad inputs
answered in one line naming the problem. Also: the committed prebuilt co-simulation
firmware the README uses is what make builds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from tests.helpers.firmware import BUILD, PREBUILT, ensure_firmware, firmware
from tests.helpers.server import ServerProcess
from tests.helpers.tools import VENV_BIN

BOARD = "mps2-an385"


def msctl(sp: ServerProcess, *args: str, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MSCTL_TARGET=sp.target)
    return subprocess.run([str(VENV_BIN / "msctl"), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=cwd)


def pingpong_yaml(tmp: Path, **override: str) -> Path:
    """The README's topology, programs relative to the file (copied beside it)."""
    for program in ("cosim_ping", "cosim_pong"):
        (tmp / f"{program}.elf").write_bytes(firmware(BOARD, program).read_bytes())
    text = """\
name: ping-pong
quantum_instructions: 10000
nodes:
  - {name: ping, board: mps2-an385, program: cosim_ping.elf}
  - {name: pong, board: mps2-an385, program: cosim_pong.elf}
links:
  - shared_memory: {size: 0x1000, mappings: {ping: 0x20200000, pong: 0x20280000}}
  - interrupt: {from: ping, doorbell: 0x20220000, mask: 1, to: pong, irq: 30}
  - interrupt: {from: pong, doorbell: 0x20220000, mask: 1, to: ping, irq: 30}
"""
    for old, new in override.items():
        assert old in text
        text = text.replace(old, new)
    path = tmp / "pingpong.yaml"
    path.write_text(text)
    return path


def one_line_error(r: subprocess.CompletedProcess[str], status: int = 1) -> str:
    """The one line of stderr; ``status`` 2 for a problem in the topology file."""
    assert r.returncode == status, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("msctl: ") and "Traceback" not in r.stderr, r.stderr
    return r.stderr


def test_the_readme_two_board_example(server_process: ServerProcess, tmp_path: Path) -> None:
    topo = pingpong_yaml(tmp_path)
    created = msctl(server_process, "cosim", "create", "-f", str(topo))
    assert created.returncode == 0, created.stderr
    name = created.stdout.split()[0]
    assert name.startswith("cosimulations/") and "ping-pong  PAUSED" in created.stdout, created.stdout
    assert [line.split()[:4] for line in created.stdout.splitlines() if line.startswith(("ping ", "pong "))] == \
        [["ping", BOARD, "unicorn", "HALTED"], ["pong", BOARD, "unicorn", "HALTED"]]

    run = msctl(server_process, "cosim", "run", "ping-pong")  # the display name finds it
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    ping = [x.removeprefix("ping | ") for x in lines if x.startswith("ping | ")]
    pong = [x.removeprefix("pong | ") for x in lines if x.startswith("pong | ")]
    assert ping == ["ping ready", *(f"ping: round {i}" for i in range(10, 101, 10)),
                    "ping: 100 round trips, pong sum 5050"], run.stdout
    assert pong == ["pong ready", "pong: 100 pings, sum 5050"], run.stdout
    assert lines[-1].startswith(f"-- {name} STOPPED at 80,029,040 ns after 200 quanta"), lines[-1]

    status = msctl(server_process, "cosim", "status", name)
    assert status.returncode == 0, status.stderr
    assert "STOPPED: stopped: sessions/ping exited with code 0" in status.stdout
    assert "100 raised" in status.stdout and "last stop: ping exit (code 0)" in status.stdout, status.stdout
    as_json = json.loads(msctl(server_process, "--json", "cosim", "status", name).stdout)["cosimulation"]
    assert {m["virtual_time_ns"] for m in as_json["members"]} == {"80029040"}
    assert [s["interrupts"] for s in as_json["link_status"][1:]] == ["100", "100"]
    listed = msctl(server_process, "cosim", "list").stdout
    assert name in listed and "ping pong" in listed and "ping exit" in listed

    # the console view afterwards: the same lines, and running an ended co-simulation is refused
    console = msctl(server_process, "cosim", "console", name, "--no-follow").stdout.splitlines()
    assert sorted(console) == sorted(x for x in lines if " | " in x)
    again = one_line_error(msctl(server_process, "cosim", "run", name))
    assert "FAILED_PRECONDITION" in again

    # a breakpoint on one member halts both at the same virtual instant (between barriers)
    second = msctl(server_process, "cosim", "create", "-f", str(topo), "--id-prefix", "bp-")
    assert second.returncode == 0 and "bp-ping-pong" in second.stdout, second.stderr
    bp = msctl(server_process, "debug", "set-breakpoint", "bp-pong", "--location", '{"file_line": "cosim_pong.c:23"}')
    assert bp.returncode == 0, bp.stderr
    halted = msctl(server_process, "cosim", "run", "bp-ping-pong")
    assert halted.returncode == 0, halted.stderr
    assert "bp-pong | pong: 100 pings" not in halted.stdout and "bp-ping | ping: round 90" in halted.stdout
    assert " PAUSED at " in halted.stdout and "breakpoint on sessions/bp-pong" in halted.stdout, halted.stdout
    now = json.loads(msctl(server_process, "--json", "cosim", "status", "bp-ping-pong").stdout)["cosimulation"]
    instant = int(now["virtual_time_ns"])
    assert [int(m["virtual_time_ns"]) for m in now["members"]] == [instant, instant]
    assert instant % int(now["quantum_ns"]) != 0  # mid-quantum: the others were brought to it exactly
    assert now["last_stop"]["reason"] == "breakpoint" and now["last_stop"]["session"] == "sessions/bp-pong"
    table = msctl(server_process, "cosim", "status", "bp-ping-pong").stdout
    assert table.count(f"{instant:,} ns") >= 3 and "last stop: bp-pong breakpoint" in table, table
    # continuing finishes the same way as the straight run; run shows only the new lines
    rest = msctl(server_process, "cosim", "run", "bp-ping-pong")
    assert rest.returncode == 0, rest.stderr
    # each member's lines in order (the view interleaves members as their consoles arrive)
    lines = [x for x in rest.stdout.splitlines() if " | " in x]
    assert [x for x in lines if x.startswith("bp-pong | ")] == ["bp-pong | pong: 100 pings, sum 5050"], rest.stdout
    assert [x for x in lines if x.startswith("bp-ping | ")] == [
        "bp-ping | ping: round 100", "bp-ping | ping: 100 round trips, pong sum 5050"], rest.stdout
    assert "STOPPED at 80,029,040 ns after 200 quanta" in rest.stdout

    # step, snapshot, restore, delete with its sessions
    third = msctl(server_process, "cosim", "create", "-f", str(topo), "--id-prefix", "st-")
    assert third.returncode == 0, third.stderr
    stepped = msctl(server_process, "cosim", "step", "st-ping-pong", "--count", "40")
    assert stepped.returncode == 0 and "16,000,000 ns, 40 quanta" in stepped.stdout, stepped.stdout
    snap = msctl(server_process, "cosim", "snapshot", "st-ping-pong")
    assert snap.returncode == 0 and "/snapshots/" in snap.stdout, snap.stderr
    assert msctl(server_process, "cosim", "step", "st-ping-pong", "--until-ns", "40000000").returncode == 0
    restored = msctl(server_process, "cosim", "restore", snap.stdout.split()[0])
    assert restored.returncode == 0 and "16,000,000 ns, 40 quanta" in restored.stdout, restored.stdout
    deleted = msctl(server_process, "cosim", "delete", "st-ping-pong", "--sessions")
    assert deleted.returncode == 0 and "deleted sessions/st-ping" in deleted.stdout, deleted.stderr
    assert "NOT_FOUND" in one_line_error(msctl(server_process, "session", "get-session", "sessions/st-pong"))


def test_ctrl_c_pauses_a_run_and_exits_130(server_process: ServerProcess, tmp_path: Path) -> None:
    # two pongs: nobody pings, both sleep for ever; the run only ends when interrupted
    topo = pingpong_yaml(tmp_path, **{"program: cosim_ping.elf": "program: cosim_pong.elf", "name: ping-pong":
                                      "name: two-pongs"})
    assert msctl(server_process, "cosim", "create", "-f", str(topo)).returncode == 0
    env = dict(os.environ, MSCTL_TARGET=server_process.target)
    proc = subprocess.Popen([str(VENV_BIN / "msctl"), "cosim", "run", "two-pongs"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        seen = [proc.stdout.readline() for _ in range(2)]  # each member's first line, then it runs on
        assert sorted(seen) == ["ping | pong ready\n", "pong | pong ready\n"], seen
        deadline = time.monotonic() + 30
        while json.loads(msctl(server_process, "--json", "cosim", "status", "two-pongs").stdout)[
                "cosimulation"]["state"] != "CO_SIM_STATE_RUNNING":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and " PAUSED at " in err, err
    state = json.loads(msctl(server_process, "--json", "cosim", "status", "two-pongs").stdout)["cosimulation"]
    assert state["state"] == "CO_SIM_STATE_PAUSED" and int(state["virtual_time_ns"]) > 0


def test_a_member_exiting_non_zero_fails_the_run(server_process: ServerProcess, tmp_path: Path) -> None:
    # pong's doorbell is not routed back: ping sleeps for ever; with pong's region mapped
    # at ping's doorbell word instead, ping reads a wrong pong and exits 1 ("protocol error")
    topo = pingpong_yaml(tmp_path, **{"pong: 0x20280000}": "pong: 0x20280010}"})
    assert msctl(server_process, "cosim", "create", "-f", str(topo)).returncode == 0
    run = msctl(server_process, "cosim", "run", "ping-pong")
    assert "ping | ping: protocol error: round 1, pong 0" in run.stdout, run.stdout
    assert run.returncode == 1 and "exited with code 1" in run.stdout, (run.returncode, run.stdout, run.stderr)


def test_bad_inputs_are_one_line_naming_the_problem(server_process: ServerProcess, tmp_path: Path) -> None:
    missing = one_line_error(msctl(server_process, "cosim", "create", "-f", str(tmp_path / "nope.yaml")), 2)
    assert "nope.yaml: cannot read: No such file or directory" in missing

    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes:\n  - name: ping\n    board: [unclosed\n")
    assert "bad.yaml: bad YAML: line 4, column 1:" in one_line_error(msctl(server_process, "cosim", "create", "-f", str(bad)), 2)

    cases = {
        "to: pong, irq: 30}": ("to: pongg, irq: 30}", "links[1].interrupt.to: unknown node 'pongg' (nodes: ping, pong)"),
        "quantum_instructions": ("quantum_instruction", "unknown key 'quantum_instruction'"),
        "program: cosim_pong.elf": ("program: no/such.elf", "nodes[1].program: no such file: no/such.elf"),
        "mask: 1, to: pong": ("mask: one, to: pong", "links[1].interrupt.mask: wants a number, got 'one'"),
        "{name: pong,": ("{name: ping,", "nodes[1].name: 'ping' is used twice"),
    }
    for old, (new, expected) in cases.items():
        topo = pingpong_yaml(tmp_path, **{old: new})
        assert expected in one_line_error(msctl(server_process, "cosim", "create", "-f", str(topo)), 2), (new, expected)

    # the server's INVALID_ARGUMENT, its field named as the topology file has it
    topo = pingpong_yaml(tmp_path, **{"to: pong, irq: 30}": "to: pong, irq: 32}"})
    err = one_line_error(msctl(server_process, "cosim", "create", "-f", str(topo)), 2)
    assert err.startswith("msctl: INVALID_ARGUMENT: ") and "pingpong.yaml: links[1].interrupt.irq: " in err, err
    assert "32 external interrupt lines" in err
    topo = pingpong_yaml(tmp_path, **{"ping: 0x20200000,": "ping: 0x40000000,"})
    err = one_line_error(msctl(server_process, "cosim", "create", "-f", str(topo)), 2)
    assert "links[0].shared_memory.mappings.ping: " in err, err
    # nothing half made is left behind: the same file goes in once fixed
    assert msctl(server_process, "session", "list").stdout.count("sessions/") == 0
    assert msctl(server_process, "cosim", "create", "-f", str(pingpong_yaml(tmp_path))).returncode == 0
    # an id already taken: one line naming the node, and the node made before it removed
    taken = one_line_error(msctl(server_process, "cosim", "create", "-f", str(topo)), 2)
    assert "nodes[0] (ping): ALREADY_EXISTS" in taken, taken
    assert "NOT_FOUND" in one_line_error(msctl(server_process, "cosim", "status", "nothing-by-that-name"))


def test_the_prebuilt_cosim_firmware_is_what_make_builds() -> None:
    """The README runs the committed copies; they must load the same bytes as the build."""
    if ensure_firmware(BOARD) is None:
        pytest.skip("no cross compiler here: nothing to compare the prebuilt copies with")

    def image(path: Path) -> tuple[int, list[tuple[int, bytes]]]:
        with path.open("rb") as f:
            elf = ELFFile(f)
            loads = [(int(s["p_paddr"]), s.data()) for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
            return int(elf.header.e_entry), loads

    copies = sorted((PREBUILT / BOARD).glob("*.elf"))
    assert {p.stem for p in copies} >= {"cosim_ping", "cosim_pong", "cosim_chatter", "cosim_responder"}
    for copy in copies:
        assert image(copy) == image(BUILD / BOARD / copy.name), f"{copy} differs from make's: copy it again"
