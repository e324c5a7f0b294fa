"""The documentation: the CLI reference is generated from the parsers and up to date, the site builds offline with
warnings as errors, and every ``medfusion ...`` command shown in the README, the guides and the comments of the config
templates parses (its command exists, its flags are the command's, the configs it names exist)."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_cli_reference_is_generated_from_the_parsers():
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        from gen_cli import render
    finally:
        sys.path.pop(0)
    assert (ROOT / "docs" / "cli.md").read_text() == render(), "run: python docs/gen_cli.py"


def test_site_builds_offline_with_warnings_as_errors(tmp_path):
    exe = shutil.which("mkdocs") or str(Path(sys.executable).parent / "mkdocs")
    assert Path(exe).exists(), "mkdocs is a test dependency (pyproject [test])"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [exe, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
        timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "index.html").read_text().count("restore") > 0


def _commands() -> list[tuple[str, list[str]]]:
    """``medfusion ...`` lines of fenced code blocks (comments and continuation lines stripped)."""
    found = []
    for page in PAGES:
        for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", page.read_text(), flags=re.S):
            block = re.sub(r"\\\n\s*", " ", block)  # join continuation lines
            for line in block.splitlines():
                line = line.split(" #")[0].strip()
                if line.startswith("medfusion "):
                    found.append((f"{page.relative_to(ROOT)}: {line}", shlex.split(line)[1:]))
    return found


def _config_commands() -> list[tuple[str, list[str]]]:
    """``medfusion <command> ...`` in the comments of ``configs/*.yaml`` (continuation lines joined; several commands
    on a line split at ``&&`` / ``;``; optional ``[...]`` parts and ``...`` placeholders left out). Mentions in
    prose (``medfusion demo`` followed by words, not flags) are not commands and are skipped."""
    found = []
    for cfg in sorted((ROOT / "configs").rglob("*.yaml")):
        text = "\n".join(line.strip().lstrip("#").strip() for line in cfg.read_text().splitlines()
                         if line.strip().startswith("#"))  # fmt: skip
        text = re.sub(r"\\\n", " ", text)
        for line in text.splitlines():
            for part in re.split(r"&&|;", line):
                m = re.search(r"\bmedfusion ([a-z][\w-]*)((?: +(?:-[^\s]*|[\w./=*\[\],-]+))*)", part)
                if not m:
                    continue
                rest = re.sub(r"(?<=\s)\[[^\]]*\]", "", m.group(2).split("`")[0]).replace("...", "").split()
                if not rest or not (rest[0].startswith("-") or "/" in rest[0] or rest[0].isupper()):
                    continue  # prose: "medfusion make-data first", "(medfusion standardize)"
                found.append(
                    (f"{cfg.relative_to(ROOT)}: medfusion {m.group(1)} {' '.join(rest)}", [m.group(1), *rest])
                )
    return found


COMMANDS = _commands() + _config_commands()


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_parses(where, argv):
    from medfusion import cli

    name, rest = argv[0], argv[1:]
    if name in ("--help", "-h"):
        return
    if name in cli.LIGHTNING_COMMANDS:
        config = cli._config_path(rest)
        assert config is not None, f"{where}: no --config"
        if not Path(config).name.startswith("my_"):  # a user's own copy of a template
            assert (ROOT / config).is_file(), f"{where}: config {config} does not exist"
        return
    assert name in cli.COMMANDS, f"{where}: unknown command {name!r}"
    module = importlib.import_module(cli.COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"medfusion {name}")
    module.add_arguments(parser)
    try:
        parser.parse_args(rest)
    except SystemExit as err:
        pytest.fail(f"{where}: the parser refuses it (exit {err.code})")


METHOD_PAGES = {
    "DiffusionCT": "diffusion_ct", "DiffusionCTAutoencoder": "diffusion_ct", "RDDM": "rddm", "DiffIRStage1": "diffir",
    "DiffIRStage2": "diffir", "DRDM": "drdm", "Segmentation": "segmentation", "Registration": "registration",
    "SupervisedRestorer": "supervised",
}  # fmt: skip


def _lightning_modules() -> dict[str, type]:
    import inspect
    import pkgutil

    import lightning as L

    import medfusion.models as pkg
    from medfusion.models.base import MedfusionModule

    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"medfusion.models.{info.name}")
        for name, cls in inspect.getmembers(mod, inspect.isclass):
            if (
                issubclass(cls, L.LightningModule)
                and cls.__module__ == mod.__name__
                and cls is not MedfusionModule
            ):
                found[name] = cls
    return found


def test_every_constructor_option_is_on_its_method_page():
    """Each option of each LightningModule is named on docs/methods/<method>.md, where its reason is stated."""
    import inspect

    modules = _lightning_modules()
    assert set(modules) <= set(METHOD_PAGES), (
        f"give these a method page: {sorted(set(modules) - set(METHOD_PAGES))}"
    )
    missing = []
    for name, cls in modules.items():
        text = (ROOT / "docs" / "methods" / f"{METHOD_PAGES[name]}.md").read_text()
        for param in inspect.signature(cls.__init__).parameters:
            if param != "self" and not re.search(rf"`[^`]*\b{param}\b[^`]*`", text):
                missing.append(f"{name}.{param}")
    assert not missing, f"options not named on their method page: {missing}"


def _python_snippets() -> list[tuple[str, str]]:
    return [
        (f"{page.relative_to(ROOT)}#{i}", block)
        for page in PAGES
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S))
    ]


SNIPPETS = _python_snippets()


@pytest.mark.parametrize("where, code", SNIPPETS, ids=[w for w, _ in SNIPPETS])
def test_python_snippets_compile_and_name_what_exists(where, code):
    """Every Python snippet of the README and the docs is valid Python (``...`` placeholders allowed), and every
    medfusion module, name and keyword argument it uses exists (the snippets' files and models are the reader's)."""
    import ast
    import inspect

    tree = ast.parse(code)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medfusion"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{where}: {node.module} has no {alias.name}"
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "medfusion"
        ):
            import medfusion

            assert hasattr(medfusion, node.attr), f"{where}: medfusion has no {node.attr}"
    namespace: dict = {}
    for node in tree.body:  # the imports, so that calls below can be checked against their signatures
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            exec(compile(ast.Module([node], []), where, "exec"), namespace)
    import medfusion

    namespace.setdefault("medfusion", medfusion)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.keywords:
            continue
        func = node.func
        target = None
        if isinstance(func, ast.Name) and func.id in namespace:
            target = namespace[func.id]
        elif (
            isinstance(func, ast.Attribute)
            and isinstance(func.value, ast.Name)
            and func.value.id == "medfusion"
        ):
            target = getattr(medfusion, func.attr)
        if target is None or not callable(target):
            continue
        params = inspect.signature(target).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            continue
        for kw in node.keywords:
            assert kw.arg is None or kw.arg in params, (
                f"{where}: {getattr(target, '__name__', target)} has no {kw.arg!r}"
            )
