"""Provenance of evaluation results: the code's commit and the library versions that decide the numbers."""

import shutil
import subprocess

import pytest
import torch

from medfusion.eval.provenance import LIBRARIES, describe, environment, source_commit

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(root, *args):
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


@needs_git
def test_source_commit_names_head_and_whether_tracked_files_changed(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    _git(tmp_path, "add", "a.py")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert source_commit(tmp_path) == {"commit": head.strip(), "dirty": False}
    (tmp_path / "untracked.txt").write_text("not part of the code\n")
    assert source_commit(tmp_path)["dirty"] is False
    (tmp_path / "a.py").write_text("x = 2\n")
    assert source_commit(tmp_path) == {"commit": head.strip(), "dirty": True}


def test_source_commit_outside_a_checkout_is_none(tmp_path):
    assert source_commit(tmp_path) is None


def test_environment_records_the_installed_versions():
    import medfusion

    env = environment()
    assert env["medfusion"] == medfusion.__version__
    assert set(env["libraries"]) == set(LIBRARIES)
    assert env["libraries"]["torch"] == torch.__version__
    line = describe(env)
    assert line.startswith(f"Environment: medfusion {medfusion.__version__} (")
    assert f"torch {torch.__version__}" in line


def test_describe_says_when_the_code_had_uncommitted_changes():
    env = {"medfusion": "0.1.0", "source": {"commit": "0123456789abcdef", "dirty": True}, "python": "3.11.7",
           "libraries": {"torch": "2.13.0", "monai": None}}  # fmt: skip
    assert describe(env) == (
        "Environment: medfusion 0.1.0 (commit 0123456, uncommitted changes); Python 3.11.7; torch 2.13.0."
    )
    assert "not a git checkout" in describe({**env, "source": None})
    assert describe(None) == ""


@needs_git
def test_a_folder_inside_a_checkout_is_not_taken_for_the_source(tmp_path):
    """A non-editable install in a virtual environment that happens to lie inside some repository."""
    _git(tmp_path, "init", "-q")
    (tmp_path / "venv" / "lib").mkdir(parents=True)
    assert source_commit(tmp_path / "venv" / "lib") is None
