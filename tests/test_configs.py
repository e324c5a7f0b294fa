"""Smoke test: every ``configs/**/*.yaml`` trains for one batch on CPU (torchgeo's ``tests/conf`` idea).

Each YAML is its own test id. For every config the test runs::

    medfusion fit --config configs/<method>/<experiment>.yaml \\
        --trainer.fast_dev_run=1 --trainer.accelerator=cpu --trainer.devices=1 \\
        --trainer.default_root_dir=<tmp> --data.init_args.manifest=<tmp dataset>/<rest>

in-process through ``medfusion.cli.main`` (saves the ~6 s torch/Lightning import per config), with the working
directory set to a temporary folder, so nothing is written into the repository.

Protocol for config authors (keep it):

1. Data: ``data.init_args.manifest`` must start with ``data/builtin2d/`` or ``data/builtin3d/`` (the folders that
   ``medfusion make-data`` writes). The test generates tiny stand-ins with
   ``medfusion.data.builtin.make_dataset(tmp/"builtin2d", n_patients=12, dim=2, size=32)`` and
   ``make_dataset(tmp/"builtin3d", n_patients=4, dim=3, size=16, depth=16)`` and replaces that prefix with the
   temporary folder; the rest of the path (the manifest's file name) is kept. Any other manifest path fails the test.
2. Stages: a config that needs a checkpoint of an earlier stage declares it in a comment line::

       # smoke-requires: configs/diffusion_ct/stage1_autoencoder.yaml as model.init_args.autoencoder_ckpt

   (several lines allowed; paths relative to the repository root). The test first trains that config for one
   step (``--trainer.max_steps=1 --trainer.limit_val_batches=1 --trainer.enable_checkpointing=true``, the same
   data redirection, recursively for its own requirements), takes the newest Lightning ``*.ckpt`` it wrote, and
   passes ``--model.init_args.autoencoder_ckpt=<that .ckpt>`` to the config under test. Each required stage is
   trained once per session.

With no configs the single test id ``no-configs`` is skipped.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# configs/demo/ holds the demo's budgets (read by `medfusion demo`), not LightningCLI configs
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name != "demo")
PREFIXES = {"data/builtin2d/": "builtin2d", "data/builtin3d/": "builtin3d"}
DATASETS = {
    "builtin2d": dict(n_patients=12, dim=2, size=32),  # 12: two validation patients, one register pair
    "builtin3d": dict(n_patients=4, dim=3, size=16, depth=16),
}
REQUIRES = re.compile(r"^\s*#\s*smoke-requires:\s*(\S+)\s+as\s+(\S+)\s*$", re.MULTILINE)


def parse_requirements(config: Path, root: Path = ROOT) -> list[tuple[Path, str]]:
    """``# smoke-requires: <config> as <dotted.arg>`` lines of ``config``: [(config path, argument)]."""
    pairs = []
    for path, arg in REQUIRES.findall(config.read_text()):
        if not arg.startswith("model.init_args."):
            raise ValueError(f"{config}: smoke-requires argument {arg!r} must start with 'model.init_args.'")
        pairs.append((root / path, arg))
    return pairs


def _builtin_make_dataset():
    from medfusion.data.builtin import make_dataset  # an import error of our own code fails the test

    return make_dataset


class SmokeRunner:
    """Generates the tiny datasets lazily and runs (and remembers) the configs of this session."""

    def __init__(self, tmp: Path, root: Path = ROOT, make_dataset=None) -> None:
        self.tmp = tmp
        self.root = root
        self.make_dataset = make_dataset
        self.datasets: dict[str, Path] = {}
        self.checkpoints: dict[Path, Path] = {}

    def dataset(self, name: str) -> Path:
        if name not in self.datasets:
            make_dataset = self.make_dataset or _builtin_make_dataset()
            make_dataset(self.tmp / name, **DATASETS[name])
            self.datasets[name] = self.tmp / name
        return self.datasets[name]

    def manifest_override(self, config: Path) -> str:
        import yaml

        doc = yaml.safe_load(config.read_text()) or {}
        manifest = ((doc.get("data") or {}).get("init_args") or {}).get("manifest")
        for prefix, name in PREFIXES.items():
            if isinstance(manifest, str) and manifest.startswith(prefix):
                return f"--data.init_args.manifest={self.dataset(name) / manifest[len(prefix) :]}"
        pytest.fail(
            f"{config.relative_to(self.root)}: data.init_args.manifest must start with one of {list(PREFIXES)}, "
            f"got {manifest!r} (see the protocol at the top of tests/test_configs.py)"
        )

    def args(self, config: Path, workdir: Path) -> list[str]:
        args = [
            "fit",
            f"--config={config}",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            f"--trainer.default_root_dir={workdir}",
            self.manifest_override(config),
        ]
        for required, arg in parse_requirements(config, self.root):
            args.append(f"--{arg}={self.checkpoint(required)}")
        return args

    def run(self, args: list[str], workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        from medfusion.cli import main

        workdir.mkdir(parents=True, exist_ok=True)
        with monkeypatch.context() as m:
            m.chdir(workdir)
            m.setattr(sys, "argv", ["medfusion"])  # LightningCLI warns when sys.argv also has arguments
            try:
                code = main(args)
            except SystemExit as e:  # argument errors in LightningCLI exit
                code = e.code
        assert code in (0, None), f"medfusion {' '.join(args)} exited with {code}"

    def checkpoint(self, config: Path) -> Path:
        """Train ``config`` for one step and return its newest ``.ckpt`` (once per session)."""
        if not config.is_file():
            pytest.fail(f"smoke-requires names a missing config: {config}")
        if config not in self.checkpoints:
            workdir = (
                self.tmp
                / "stages"
                / config.relative_to(self.root).with_suffix("").as_posix().replace("/", "__")
            )
            args = self.args(config, workdir) + [
                "--trainer.max_steps=1",
                "--trainer.max_epochs=1",
                "--trainer.limit_val_batches=1",
                "--trainer.num_sanity_val_steps=0",
                "--trainer.enable_checkpointing=true",
            ]
            with pytest.MonkeyPatch.context() as m:
                self.run(args, workdir, m)
            ckpts = sorted(workdir.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
            if not ckpts:
                pytest.fail(
                    f"{config.relative_to(self.root)} wrote no .ckpt under {workdir} for the next stage"
                )
            self.checkpoints[config] = ckpts[-1]
        return self.checkpoints[config]


@pytest.fixture(scope="session")
def runner(tmp_path_factory) -> SmokeRunner:
    return SmokeRunner(tmp_path_factory.mktemp("configs"))


_PARAMS = [pytest.param(c, id=c.relative_to(ROOT).as_posix()) for c in CONFIGS] or [
    pytest.param(None, id="no-configs", marks=pytest.mark.skip(reason="no configs/**/*.yaml yet"))
]


@pytest.mark.parametrize("config", _PARAMS)
def test_config_fast_dev_run(config: Path, runner: SmokeRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    workdir = runner.tmp / "runs" / config.relative_to(ROOT).with_suffix("").as_posix().replace("/", "__")
    runner.run(runner.args(config, workdir) + ["--trainer.fast_dev_run=1"], workdir, monkeypatch)


def test_smoke_requires_protocol_parses(tmp_path: Path) -> None:
    cfg = tmp_path / "stage2.yaml"
    cfg.write_text(
        "# smoke-requires: configs/a/stage1.yaml as model.init_args.stage1_ckpt\n"
        "  #smoke-requires:  configs/b/vae.yaml   as model.init_args.autoencoder_ckpt  \n"
        "model:\n  class_path: x\n"
    )
    assert parse_requirements(cfg) == [
        (ROOT / "configs/a/stage1.yaml", "model.init_args.stage1_ckpt"),
        (ROOT / "configs/b/vae.yaml", "model.init_args.autoencoder_ckpt"),
    ]
    cfg.write_text("# smoke-requires: configs/a/stage1.yaml as trainer.ckpt_path\n")
    with pytest.raises(ValueError, match="model.init_args"):
        parse_requirements(cfg)


# --- the protocol itself, end to end, on a toy two-stage "method" ---------------------------------------------


def _toy_module():
    import lightning as L
    import torch

    class Toy(L.LightningModule):
        def __init__(self, lr: float = 0.1, stage1_ckpt: str | None = None) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.w = torch.nn.Parameter(torch.zeros(()))
            if stage1_ckpt is not None:  # stage 2: start from stage 1's weight
                self.w.data.copy_(torch.load(stage1_ckpt, weights_only=True)["state_dict"]["w"])
                TOY_LOADED.append(stage1_ckpt)

        def training_step(self, batch, batch_idx):
            return (self.w - batch["source"].mean()) ** 2

        def validation_step(self, batch, batch_idx):
            self.log("val", batch["source"].mean(), batch_size=len(batch["source"]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    return Toy


TOY_LOADED: list[str] = []


def _toy_dataset(root: Path, n_patients: int, dim: int, size: int, depth: int | None = None) -> None:
    """Stand-in for ``make_dataset``: paired source/target NIfTIs and ``manifest.json``."""
    import nibabel as nib
    import numpy as np

    from medfusion.data.manifest import write_manifest

    rng = np.random.default_rng(0)
    shape = (size, size) if dim == 2 else (size, size, depth)
    entries = []
    for i in range(n_patients):
        vol = rng.uniform(-500, 500, size=shape).astype(np.float32)
        for key in ("source", "target"):
            path = root / f"p{i}" / f"{key}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(vol, np.eye(4)), str(path))
        entries.append(
            {
                "source": f"{root}/p{i}/source.nii.gz",
                "target": f"{root}/p{i}/target.nii.gz",
                "case_id": f"p{i}",
            }
        )
    splits = {"training": entries[:2], "validation": entries[2:3], "test": entries[3:]}
    write_manifest(root / "manifest.json", splits, task="standardize")


def test_runner_trains_required_stage_first_and_passes_its_checkpoint(tmp_path: Path, monkeypatch) -> None:
    globals()["Toy"] = _toy_module()
    repo = tmp_path / "repo"
    (repo / "configs" / "toy").mkdir(parents=True)
    body = (
        f"model:\n  class_path: {__name__}.Toy\n"
        "data:\n  class_path: medfusion.data.datamodule.ManifestDataModule\n  init_args:\n"
        "    manifest: data/builtin2d/manifest.json\n    task: standardize\n    roi_size: [8, 8]\n    batch_size: 2\n"
        "trainer:\n  max_epochs: 1\n  enable_progress_bar: false\n  enable_model_summary: false\n"
    )
    (repo / "configs" / "toy" / "stage1.yaml").write_text(body)
    stage2 = repo / "configs" / "toy" / "stage2.yaml"
    stage2.write_text("# smoke-requires: configs/toy/stage1.yaml as model.init_args.stage1_ckpt\n" + body)
    runner = SmokeRunner(tmp_path / "work", root=repo, make_dataset=_toy_dataset)
    args = runner.args(stage2, tmp_path / "work" / "run")
    assert any(a.startswith("--model.init_args.stage1_ckpt=") and a.endswith(".ckpt") for a in args)
    assert f"--data.init_args.manifest={tmp_path / 'work' / 'builtin2d' / 'manifest.json'}" in args
    TOY_LOADED.clear()
    runner.run(args + ["--trainer.fast_dev_run=1"], tmp_path / "work" / "run", monkeypatch)
    assert TOY_LOADED == [str(runner.checkpoints[repo / "configs" / "toy" / "stage1.yaml"])]
    assert not (repo / "lightning_logs").exists() and not (Path.cwd() / "lightning_logs").exists()
    bad = repo / "configs" / "toy" / "bad.yaml"
    bad.write_text(body.replace("data/builtin2d/", "/data/elsewhere/"))
    with pytest.raises(pytest.fail.Exception, match="must start with one of"):
        runner.args(bad, tmp_path / "work" / "bad")


def _toy_config(repo: Path, name: str, extra_init: str = "") -> Path:
    (repo / "configs" / "toy").mkdir(parents=True, exist_ok=True)
    path = repo / "configs" / "toy" / f"{name}.yaml"
    path.write_text(
        f"model:\n  class_path: {__name__}.Toy\n" + (f"  init_args:\n{extra_init}" if extra_init else "")
        + "data:\n  class_path: medfusion.data.datamodule.ManifestDataModule\n  init_args:\n"
        "    manifest: MANIFEST\n    task: standardize\n    roi_size: [8, 8]\n    batch_size: 2\n"
        "trainer:\n  max_steps: 2\n  enable_progress_bar: false\n  enable_model_summary: false\n"
        "  limit_val_batches: 1\n  num_sanity_val_steps: 0\n"
    )
    return path


def test_config_without_checkpoint_callback_saves_last_ckpt_per_config(tmp_path: Path, monkeypatch) -> None:
    """A config naming no ModelCheckpoint writes ``checkpoints/<method>/<experiment>/last.ckpt`` in the run folder."""
    from medfusion.cli import main

    globals()["Toy"] = _toy_module()
    _toy_dataset(tmp_path / "data", n_patients=4, dim=2, size=8)
    config = _toy_config(tmp_path / "repo", "stage1")
    config.write_text(config.read_text().replace("MANIFEST", str(tmp_path / "data" / "manifest.json")))
    work = tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "argv", ["medfusion"])
    assert main(["fit", f"--config={config}", "--trainer.accelerator=cpu", "--trainer.devices=1"]) == 0
    assert (work / "checkpoints" / "toy" / "stage1" / "last.ckpt").is_file()
    assert not (work / "lightning_logs" / "version_0" / "checkpoints").exists()


def test_missing_stage_checkpoint_stops_with_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    """A stage path that does not exist: one line naming the config key and the path, exit 2, nothing built."""
    from medfusion.cli import main

    globals()["Toy"] = _toy_module()
    TOY_LOADED.clear()
    config = _toy_config(tmp_path / "repo", "stage2", "    stage1_ckpt: checkpoints/toy/stage1/last.ckpt\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["medfusion"])
    assert main(["fit", f"--config={config}", "--trainer.accelerator=cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "model.init_args.stage1_ckpt" in err[0] and "checkpoints/toy/stage1/last.ckpt" in err[0]
    assert TOY_LOADED == []


def test_progress_bar_of_a_step_budget_names_no_negative_epoch_count(tmp_path: Path) -> None:
    import lightning

    from medfusion.models.progress import step_progress_bar_class

    bar = step_progress_bar_class()()
    bar._trainer = lightning.pytorch.Trainer(max_steps=7, logger=False, default_root_dir=tmp_path)
    assert bar._get_train_description(9).strip() == "Epoch 9 (step budget 7)"
    bar._trainer = lightning.pytorch.Trainer(max_epochs=3, logger=False, default_root_dir=tmp_path)
    assert bar._get_train_description(1).strip() == "Epoch 1/2"
