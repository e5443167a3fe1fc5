"""msctl in a real terminal, as a person sees it: ``msctl debug`` and ``msctl telemetry
watch`` run in a tmux pane (a private tmux server per test), driven with send-keys and
read with capture-pane. Every wait polls the screen against a deadline."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from machineserver.sdk import Client
from machineserver.v1 import common_pb2, job_pb2
from tests.helpers.firmware import firmware
from tests.helpers.server import ServerProcess
from tests.helpers.tools import VENV_BIN, require_tool

PROMPT = "(msctl) "
SHELL_PROMPT = "$ "


class Pane:
    """One tmux pane running a plain bash, on a tmux server of its own."""

    def __init__(self, socket: Path, env: dict[str, str]) -> None:
        self.socket = socket
        # skipped without tmux; under scripts/test (which installs it) failed
        self.tmux = str(require_tool("tmux", "drives msctl in a real terminal"))
        # the server (started by the first command) and so the pane inherit env
        self._tmux("-f", "/dev/null", "new-session", "-d", "-s", "t", "-x", "150", "-y", "50",
                   f"env PS1='{SHELL_PROMPT}' bash --norc --noprofile", env=env)
        self._tmux("set-option", "-t", "t", "history-limit", "5000")
        self.wait_for(lambda screen: screen.rstrip().endswith("$"), "the shell's prompt")

    def _tmux(self, *args: str, env: dict[str, str] | None = None) -> str:
        r = subprocess.run([self.tmux, "-S", str(self.socket), *args], capture_output=True, text=True, timeout=20,
                           env=env)
        assert r.returncode == 0, (args, r.stderr)
        return r.stdout

    def send(self, *keys: str) -> None:
        """tmux key names (Enter, Up, C-c) or literal text, one argument each."""
        for key in keys:
            literal = key not in ("Enter", "Up", "Down", "C-c", "C-d")
            self._tmux("send-keys", "-t", "t", *(["-l"] if literal else []), key)

    def line(self, text: str) -> None:
        self.send(text, "Enter")

    def screen(self, visible: bool = False) -> str:
        """What the pane shows, lines joined where wrapped: with its scrollback, or only
        what is on the screen now (``visible``)."""
        return self._tmux("capture-pane", "-p", "-J", "-t", "t", *([] if visible else ["-S", "-5000"]))

    def wait_for(self, ready: Callable[[str], bool], what: str, timeout: float = 60, visible: bool = False) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen(visible)
            if ready(screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} on the screen within {timeout} s:\n{screen}")
            time.sleep(0.1)

    def wait_text(self, text: str, timeout: float = 60) -> str:
        """The screen, once ``text`` appears in it."""
        return self.wait_for(lambda s: text in s, repr(text), timeout)

    def kill(self) -> None:
        subprocess.run([self.tmux, "-S", str(self.socket), "kill-server"], capture_output=True, timeout=20)


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server whose jobs run on its own workers (not embedded Ray: msctl is the subject)."""
    sp = ServerProcess(tmp_path / "data", "--job-engine", "local").start()
    try:
        yield sp
    finally:
        sp.stop()


@pytest.fixture
def pane_env(server_process: ServerProcess, tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TMUX")}
    env.update(MSCTL_TARGET=server_process.target, HOME=str(home), TERM="xterm-256color",
               PATH=f"{VENV_BIN}:{env.get('PATH', '')}", INPUTRC="/dev/null")
    env.pop("PROMPT_COMMAND", None)
    return env


@pytest.fixture
def pane(pane_env: dict[str, str]) -> Iterator[Pane]:
    # a short folder: a unix socket's path must fit in 108 bytes
    folder = Path(tempfile.mkdtemp(prefix="mstmux"))
    p: Pane | None = None
    try:
        p = Pane(folder / "s", pane_env)
        yield p
    finally:
        if p is not None:
            p.kill()
        shutil.rmtree(folder, ignore_errors=True)


def session_with(server_process: ServerProcess, sid: str, program: str) -> Client:
    client = Client.connect(server_process.target, timeout=30)
    name = client.upload_program(str(firmware("lm3s6965evb", program))).program.name
    client.sessions.create_session(board_template="lm3s6965evb", program=name, session_id=sid, power_on=True)
    return client


def wait_running(client: Client, session: str) -> None:
    deadline = time.monotonic() + 30
    while client.sessions.get_session(name=session).session.state != common_pb2.SESSION_STATE_RUNNING:
        assert time.monotonic() < deadline, "the session never ran"
        time.sleep(0.05)


def instructions(client: Client, session: str) -> int:
    return client.telemetry.get_session_metrics(name=session).metrics.instructions


def prompts(screen: str) -> int:
    return screen.count(PROMPT)


def test_debug_in_a_terminal(server_process: ServerProcess, pane: Pane, pane_env: dict[str, str]) -> None:
    # echo: prints a line, then polls the UART for ever: `c` never stops by itself
    client = session_with(server_process, "tty", "echo")
    try:
        pane.line("msctl debug tty; echo rc=$?")
        screen = pane.wait_text(PROMPT)
        assert "attached to sessions/tty as controller" in screen

        # a command that needs an argument says which, how and an example (gdb's habit)
        pane.line("x")
        screen = pane.wait_for(lambda s: prompts(s) >= 2, "the prompt after x")
        assert "Argument required (starting display address)." in screen
        assert "usage: x ADDR [WORDS]" in screen and "e.g. x 0x20000000" in screen
        pane.line("break")
        screen = pane.wait_for(lambda s: prompts(s) >= 3, "the prompt after break")
        assert "Argument required (a location)." in screen and "break main" in screen

        pane.line("break main")
        screen = pane.wait_text("breakpoint 1 at 0x")
        assert re.search(r"breakpoint 1 at 0x[0-9a-f]{8} \(main \S*echo\.c:\d+\)", screen), screen
        pane.line("c")
        screen = pane.wait_text("[breakpoint] 0x")
        assert re.search(r"\[breakpoint\] 0x[0-9a-f]{8} main at \S*echo\.c:\d+", screen), screen

        # registers in hex, four to a line
        pane.line("regs")
        screen = pane.wait_for(lambda s: re.search(r"\s+pc 0x[0-9a-f]{8}", s) is not None, "pc in hex")
        assert re.search(r"\s+r0 0x[0-9a-f]{8}\s+r1 0x[0-9a-f]{8}", screen), screen
        assert re.search(r"\s+sp 0x[0-9a-f]{8}", screen), screen

        # memory: addresses and words in hex
        pane.line("x 0x20000000 4")
        screen = pane.wait_for(lambda s: re.search(r"^0x20000000: (0x[0-9a-f]{8} ?){4}$", s, re.M) is not None,
                               "four words of memory at 0x20000000")

        # Up recalls the previous command (readline's history): the same dump again
        pane.send("Up")
        pane.wait_for(lambda s: s.rstrip().endswith(f"{PROMPT}x 0x20000000 4"), "the recalled command")
        pane.send("Enter")
        pane.wait_for(lambda s: len(re.findall(r"^0x20000000: ", s, re.M)) == 2, "the recalled x's dump")

        # Ctrl-C at the prompt: Quit and a fresh prompt; the tool goes on
        before = prompts(pane.screen())
        pane.send("C-c")
        screen = pane.wait_for(lambda s: prompts(s) > before, "a fresh prompt after Ctrl-C")
        assert "Quit" in screen

        # c runs for ever (echo waits for input); Ctrl-C halts the target, back to the prompt
        pane.line("c")
        wait_running(client, "sessions/tty")
        before = prompts(pane.screen())
        pane.send("C-c")
        screen = pane.wait_for(lambda s: prompts(s) > before, "the prompt after Ctrl-C during c")
        tail = screen[screen.rindex("Program received signal SIGINT"):]
        assert re.search(r"\[halt\] 0x[0-9a-f]{8}", tail), tail
        state = client.sessions.get_session(name="sessions/tty").session.state
        assert state == common_pb2.SESSION_STATE_HALTED, common_pb2.SessionState.Name(state)

        # still attached and in control: a step works after the interrupt
        pane.line("si")
        pane.wait_for(lambda s: re.search(r"\[step\] 0x[0-9a-f]{8}", s) is not None, "a step after Ctrl-C")

        # a long step (the Attach stream busy with it) is halted by Ctrl-C too
        # (the session stays HALTED while it steps: the instruction count says the step runs;
        # a count that only moves at the end still gives the step ample time to start)
        counted = instructions(client, "sessions/tty")
        pane.line("si 1000000000")
        deadline = time.monotonic() + 10
        while instructions(client, "sessions/tty") == counted and time.monotonic() < deadline:
            time.sleep(0.05)
        before = prompts(pane.screen())
        pane.send("C-c")
        screen = pane.wait_for(lambda s: prompts(s) > before, "the prompt after Ctrl-C during si")
        tail = screen[screen.rindex("Program received signal SIGINT"):]
        assert re.search(r"\[halt\] 0x[0-9a-f]{8}", tail), tail
        assert client.sessions.get_session(name="sessions/tty").session.state == common_pb2.SESSION_STATE_HALTED
        assert instructions(client, "sessions/tty") - counted < 10**9  # cut short, not run to its end
        pane.line("regs pc")
        pane.wait_for(lambda s: re.search(r"^\s+pc 0x[0-9a-f]{8}\s*$", s, re.M) is not None, "pc after the halted si")

        pane.line("quit")
        screen = pane.wait_text("rc=0")
        assert "Traceback" not in screen
        # the history was kept for the next run
        history = Path(pane_env["HOME"], ".msctl_history").read_text()
        assert "x 0x20000000 4" in history and "break main" in history
    finally:
        client.close()


def test_ctrl_d_detaches_and_an_empty_line_repeats_a_step(server_process: ServerProcess, pane: Pane) -> None:
    client = session_with(server_process, "rep", "hello")
    try:
        pane.line("msctl debug rep; echo rc=$?")
        pane.wait_text(PROMPT)
        pane.line("si")
        pane.wait_for(lambda s: len(re.findall(r"\[step\] 0x", s)) == 1, "one step")
        pane.send("Enter")  # repeats si
        screen = pane.wait_for(lambda s: len(re.findall(r"\[step\] 0x", s)) == 2, "the repeated step")
        pcs = re.findall(r"\[step\] (0x[0-9a-f]{8})", screen)
        assert pcs[0] != pcs[1], screen
        pane.send("C-d")
        screen = pane.wait_text("rc=0")
        assert "Traceback" not in screen

        # a history file that cannot be written is no history, not an error
        pane.line("HOME=/nonexistent/home msctl debug rep; echo rc=$?")
        pane.wait_for(lambda s: prompts(s) == 4, "the prompt of the second run")
        pane.line("quit")
        screen = pane.wait_for(lambda s: s.count("rc=0") == 2, "the second rc=0")
        assert "Traceback" not in screen
    finally:
        client.close()


def test_telemetry_watch_refreshes_and_ctrl_c_ends_it(pane: Pane) -> None:
    pane.line("msctl telemetry watch --interval 0.2; echo rc=$?")
    screen = pane.wait_for(lambda s: re.search(r"^cpu0\s+\[[#.]+\]", s, re.M) is not None, "the cpu table",
                           visible=True)
    assert re.search(r"^mem\s+\[[#.]+\]\s+\d+\.\d%", screen, re.M), screen
    # each frame replaces the last: one on the screen, and its time moves on (a clock of seconds)
    assert len(re.findall(r"^host ", screen, re.M)) == 1, screen
    first = re.findall(r"^host\s+(\S+ \S+)", screen, re.M)[0]
    screen = pane.wait_for(lambda s: first not in s and re.search(r"^cpu0\s+\[", s, re.M) is not None,
                           "a refreshed frame", visible=True)
    assert len(re.findall(r"^host ", screen, re.M)) == 1, screen
    # drawn over in place: the scrollback keeps no old frames either
    assert len(re.findall(r"^host ", pane.screen(), re.M)) == 1, pane.screen()
    pane.send("C-c")
    screen = pane.wait_text("rc=130")
    assert "msctl: interrupted" in screen
    assert "Traceback" not in screen


def test_ctrl_c_during_job_watch_cancels_with_130(server_process: ServerProcess, pane: Pane, tmp_path: Path) -> None:
    # echo waits for input for ever: its run goes on until cancelled
    (tmp_path / "echo.elf").write_bytes(firmware("lm3s6965evb", "echo").read_bytes())
    suite = tmp_path / "suite.yaml"
    suite.write_text("programs: [echo.elf]\nboards: [lm3s6965evb]\ncriteria: {pass_regex: bye, host_timeout: 120s}\n")
    with Client.connect(server_process.target, timeout=30) as client:
        pane.line(f"msctl job run {suite} --no-wait")
        screen = pane.wait_for(lambda s: re.search(r"^jobs/\S+$", s, re.M) is not None, "the job's name")
        name = re.findall(r"^(jobs/\S+)$", screen, re.M)[-1]
        pane.line(f"msctl job watch {name} --cancel-on-interrupt; echo rc=$?")
        # the live progress bar: msctl follows the job
        pane.wait_for(lambda s: "running" in s and "━" in s, "the progress bar")
        pane.send("C-c")
        screen = pane.wait_text("rc=130")
        assert f"msctl: interrupted: cancelled {name} (CANCELLED" in screen, screen
        assert "Traceback" not in screen
        assert client.jobs.get_job(name=name).job.state == job_pb2.JOB_STATE_CANCELLED
