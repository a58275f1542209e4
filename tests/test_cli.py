"""The one entry point: every stage is a subcommand with its own help, callable in-process."""

import subprocess
import sys

import pytest

from vlmforge.cli import COMMANDS, build_parser, main

EXPECTED = {"synth", "tokenizer", "curate", "pack", "train", "eval", "export", "demo", "generate", "model-info"}


def registered() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return list(sub.choices)


def test_every_stage_is_registered():
    assert EXPECTED <= set(registered()), f"missing: {EXPECTED - set(registered())}"
    assert set(registered()) == {name for name, _ in COMMANDS}


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in EXPECTED:
        assert name in out


@pytest.mark.parametrize("name", [n for n, _ in COMMANDS])
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"vlmforge {name}" in out and len(out.splitlines()) > 3


def test_console_script_and_module_entry_points_work():
    out = subprocess.run([sys.executable, "-m", "vlmforge", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("vlmforge ")
