"""``medfusion <cmd> --help`` works for every data/inference command (argparse exits with status 0)."""

from __future__ import annotations

import pytest

from medfusion import cli


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_command_help_exits_zero(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    assert f"medfusion {command}" in capsys.readouterr().out


def test_top_level_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in [*cli.COMMANDS, *cli.LIGHTNING_COMMANDS])


def test_unknown_command_names_the_valid_ones(capsys):
    assert cli.main(["no-such-command"]) == 2
    assert "valid commands" in capsys.readouterr().err
