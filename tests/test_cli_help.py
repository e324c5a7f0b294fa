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


def test_help_exit_table_is_the_exit_codes_module(capsys):
    from medfusion import exit_codes

    codes = {
        exit_codes.EXIT_OK, exit_codes.EXIT_SOME_FAILED, exit_codes.EXIT_NOTHING_DONE, exit_codes.EXIT_INCOMPLETE,
    }  # fmt: skip
    assert {code for code, _ in cli.EXIT_CODE_TABLE} == codes == {0, 1, 2, 3}
    cli.main(["--help"])
    out = capsys.readouterr().out
    assert all(f"  {code}  {text}" in out for code, text in cli.EXIT_CODE_TABLE)


@pytest.mark.parametrize(
    ("done", "failed", "incomplete", "code"),
    [(3, 0, False, 0), (2, 1, False, 1), (0, 3, False, 2), (0, 0, False, 0), (3, 0, True, 3), (2, 1, True, 1)],
)
def test_batch_exit_code(done, failed, incomplete, code):
    from medfusion.exit_codes import batch_exit_code

    assert batch_exit_code(done, failed, incomplete=incomplete) == code
