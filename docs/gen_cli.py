"""Write docs/cli.md from the command-line parsers (``python docs/gen_cli.py``); tests/test_docs.py checks it is
up to date, so the reference cannot drift from the code."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def render() -> str:
    sys.path.insert(0, str(HERE.parent))
    from medfusion import cli

    os.environ["COLUMNS"] = "100"  # argparse wraps help at the terminal width: fix it
    parts = [
        "# Command line",
        "",
        "Generated from the parsers by `docs/gen_cli.py`; do not edit by hand.",
        "",
        "```text",
        cli._top_help(),
        "```",
        "",
        "Training commands (`fit`, `validate`, `test`, `predict`) are Lightning's `LightningCLI`: "
        "`medfusion fit --config configs/<method>/<experiment>.yaml [--section.key=value ...]`; "
        "`medfusion fit --help` lists every option of a config's classes.",
    ]
    for name, (module_name, text) in cli.COMMANDS.items():
        module = importlib.import_module(module_name)
        parser = argparse.ArgumentParser(prog=f"medfusion {name}", description=text)
        module.add_arguments(parser)
        parts += ["", f"## {name}", "", "```text", parser.format_help().rstrip(), "```"]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    (HERE / "cli.md").write_text(render())
