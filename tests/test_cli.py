"""The top-level CLI: interrupts at any moment are one line, and SIGTERM is Ctrl-C only where a command opts in."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys

import pytest

from sdrt import cli
from sdrt._signals import Terminated, sigterm_as_interrupt, terminate_as_interrupt


def test_ctrl_c_while_the_parser_is_built_is_one_line(monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["generate", "e", "x"]) == 130
    assert capsys.readouterr().err == "sdrt: interrupted\n"


def _in_a_fresh_process(test):
    """Run the test in a child pytest: it sends SIGTERM to its own process, which must not be the suite's (the
    suite's process holds the threads of earlier tests' ONNX Runtime sessions and servers by then)."""
    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        if os.environ.get("SDRT_TEST_CHILD") == test.__name__:
            return test(*args, **kwargs)
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::{test.__name__}"],
                           env=dict(os.environ, SDRT_TEST_CHILD=test.__name__), capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
        assert "1 passed" in r.stdout, r.stdout[-2000:]
    return wrapper


def _with_command(monkeypatch, func):
    """The CLI with one more subcommand, `probe`, that runs ``func``."""
    real = cli._commands()

    def add_probe(sub):
        sub.add_parser("probe").set_defaults(func=func)

    monkeypatch.setattr(cli, "_commands", lambda: [*real, add_probe])


@_in_a_fresh_process
def test_sigterm_in_a_command_that_opted_in_is_one_line_and_runs_its_cleanup(monkeypatch, capsys):
    cleaned = []

    @terminate_as_interrupt
    def probe(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("not reached: the handler raises first")
        finally:
            cleaned.append(True)

    _with_command(monkeypatch, probe)
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["probe"]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err == "sdrt probe: terminated\n"
    assert cleaned == [True]
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is the command's, not the process's


@_in_a_fresh_process
def test_sigterm_handler_is_installed_only_inside_the_block():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as info:
        with sigterm_as_interrupt():
            assert signal.getsignal(signal.SIGTERM) not in (before, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("not reached: the handler raises first")
    assert isinstance(info.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGTERM) == before


def test_writing_commands_opt_in():
    """export, build, generate, bench and demo clean up on SIGTERM (a server would install its own handler)."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in ("export", "build", "generate", "bench", "demo"):
        func = sub.choices[name].get_default("func")
        assert getattr(func, "__wrapped__", None) is not None, name
