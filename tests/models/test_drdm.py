"""DRDM LightningModule: loss decreases, seeded sampling, Algorithm 2 step counts, logging, export, 2D and 3D."""

from __future__ import annotations

import pytest
import torch

from medfusion import keys
from medfusion.models.drdm import DRDM


def disc_batch(nd, n, b=2):
    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float32)] * nd, indexing="ij")
    d2 = sum((a - n / 2 + 1.5 * i) ** 2 for i, a in enumerate(axes))
    label = (d2 < (n / 4) ** 2).long() * 2 + (d2 < (n / 8) ** 2).long() * 3  # values {0, 2, 5}
    img = label.float() / 5 + 0.05 * torch.sin(axes[0])
    return {
        keys.IMAGE: img[None, None].repeat(b, 1, *[1] * nd),
        keys.LABEL: label[None, None].repeat(b, 1, *[1] * nd),
    }


@pytest.mark.parametrize("nd, n", [(2, 32), pytest.param(3, 16, marks=pytest.mark.slow)])
def test_one_optimisation_step_lowers_the_loss(nd, n):
    torch.manual_seed(0)
    model = DRDM(spatial_dims=nd, ctl_size=32 if nd == 2 else 16, lr=1e-3)
    batch = disc_batch(nd, n)
    opt = model.configure_optimizers()

    def loss():
        return model.losses(batch[keys.IMAGE], generator=torch.Generator().manual_seed(3)).total

    before = loss()
    assert torch.isfinite(before)
    for _ in range(1):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < before.item()


class CountingNet(torch.nn.Module):
    """A cheap stand-in recovery net: a fixed smooth contraction, counting its calls."""

    def __init__(self, nd):
        super().__init__()
        self.nd = nd
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        axes = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in x.shape[2:]], indexing="ij")
        return -0.3 * torch.stack(axes)[None].expand(x.shape[0], -1, *x.shape[2:]) * (x.mean() + 1)


def test_real_net_sample_2d():
    torch.manual_seed(2)
    model = DRDM(spatial_dims=2, ctl_size=32)
    batch = disc_batch(2, 32, b=1)
    out = model.sample(batch[keys.IMAGE], t_start=10, steps=2, generator=torch.Generator().manual_seed(0))
    assert out.ddf.shape == (1, 2, 32, 32) and torch.isfinite(out.ddf).all()
    assert model.recovery_net.training  # sample() restores the mode


@pytest.mark.parametrize("nd, n", [(2, 32), (3, 16)])
def test_sample_is_seeded_and_runs_the_requested_steps(nd, n):
    torch.manual_seed(1)
    net = CountingNet(nd)
    model = DRDM(recovery_net=net, spatial_dims=nd, ctl_size=32 if nd == 2 else 16)
    batch = disc_batch(nd, n, b=1)
    kw = dict(label=batch[keys.LABEL], label_mode="onehot")
    a = model.sample(batch[keys.IMAGE], t_start=20, steps=4, generator=torch.Generator().manual_seed(0), **kw)
    assert net.calls == 4
    b = model.sample(batch[keys.IMAGE], t_start=20, steps=4, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(a.ddf, b.ddf) and torch.equal(a.image, b.image)
    assert a.ddf.shape == (1, nd, *[n] * nd) and a.image.shape == batch[keys.IMAGE].shape
    assert set(a.label.unique().tolist()) <= {0, 2, 5}
    net.calls = 0
    model.sample(batch[keys.IMAGE], t_start=12, generator=torch.Generator().manual_seed(0))
    assert net.calls == 12  # the paper's T' steps
    net.calls = 0
    model.sample(
        batch[keys.IMAGE], t_start=12, legacy_sampler=True, generator=torch.Generator().manual_seed(0)
    )
    assert net.calls == 80  # the official sampler
    c = model.sample(batch[keys.IMAGE], t_start=20, steps=4, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a.ddf, c.ddf)


def test_fit_logs_folding_and_scale_and_exports(tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader

    from medfusion.models.export import export_model, load_model

    data = [{k: v[0] for k, v in disc_batch(2, 32, b=1).items()} for _ in range(4)]
    loader = DataLoader(data, batch_size=2)
    model = DRDM(spatial_dims=2, ctl_size=32, val_t_start=10, val_recovery_steps=2, val_num_samples=1)
    trainer = L.Trainer(
        max_steps=2,
        limit_val_batches=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, loader, loader)
    metrics = trainer.callback_metrics
    for key in (
        "val/loss",
        "val/folding_pct",
        "val/disp_mean_pct",
        "val/disp_max_pct",
        "val/random_folding_pct",
    ):
        assert key in metrics and torch.isfinite(metrics[key])
    assert 0 <= metrics["val/folding_pct"] <= 100
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    export_model(model, tmp_path / "export")
    img = data[0][keys.IMAGE][None]
    for path in (tmp_path / "export", ckpt):
        loaded = load_model(path)
        assert isinstance(loaded, DRDM)
        x = torch.rand(1, 1, 32, 32)
        t = torch.tensor([7])
        assert torch.allclose(loaded(x, t), model.eval()(x, t), atol=1e-6)
    del img


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="spatial_dims"):
        DRDM(spatial_dims=4)
    with pytest.raises(ValueError, match="border"):
        DRDM(loss_padding="wrap")
    with pytest.raises(ValueError, match="val_t_start"):
        DRDM(val_t_start=0)


def test_augment_command_writes_triplets_and_resumes(tmp_path):
    import json

    import numpy as np

    from medfusion.cli import main
    from medfusion.data.manifest import load_manifest
    from medfusion.io.displacement import read_voxel_field
    from medfusion.io.nifti import read_nifti, write_nifti
    from medfusion.models.export import export_model

    affine = np.diag([0.8, 0.8, 1.0, 1.0])
    entries = []
    for i in range(2):
        b = disc_batch(2, 32, b=1)
        write_nifti(tmp_path / f"img{i}.nii.gz", b[keys.IMAGE][0, 0].numpy() * 1000, affine)
        write_nifti(tmp_path / f"lab{i}.nii.gz", b[keys.LABEL][0, 0].numpy().astype(np.int16), affine)
        entries.append({"image": f"img{i}.nii.gz", "label": f"lab{i}.nii.gz"})
    (tmp_path / "m.json").write_text(json.dumps({"task": "segment", "training": entries}))
    torch.manual_seed(0)
    export_model(DRDM(spatial_dims=2, ctl_size=32), tmp_path / "model")
    args = ["augment", "--ckpt", str(tmp_path / "model"), "--input", str(tmp_path / "m.json"), "--n", "2"]
    args += [
        "--output",
        str(tmp_path / "out"),
        "--t-range",
        "5",
        "6",
        "--steps",
        "1",
        "--label-mode",
        "onehot",
    ]
    assert main(args) == 0
    man = load_manifest(tmp_path / "out" / "manifest.json", task="segment")
    assert len(man.split("training")) == 4
    first = read_voxel_field(tmp_path / "out" / "fields" / "img0_aug001.nii.gz", spatial_dims=2)
    assert first.ddf.shape == (2, 32, 32) and np.allclose(first.affine, affine)  # a NIfTI vector image
    lab = read_nifti(tmp_path / "out" / "labels" / "img0_aug001.nii.gz").array
    assert set(np.unique(lab).tolist()) <= {0, 2, 5}
    stamp = (tmp_path / "out" / "images" / "img1_aug000.nii.gz").stat().st_mtime_ns
    (tmp_path / "out" / "images" / "img0_aug001.nii.gz").unlink()  # an interrupted run: one file missing
    assert main(args) == 0
    assert (tmp_path / "out" / "images" / "img1_aug000.nii.gz").stat().st_mtime_ns == stamp  # kept
    again = read_voxel_field(tmp_path / "out" / "fields" / "img0_aug001.nii.gz", spatial_dims=2)
    assert np.allclose(again.ddf, first.ddf)  # the resumed sample equals the original run's


def test_augment_names_are_unique_for_the_builtin_layout():
    """Every built-in case is ``case_*/standard.nii.gz``: output names must not collide (a collision made the
    resume logic skip every case after the first)."""
    from medfusion.apps.augment import case_names

    same_stem = [{"image": f"case_{i:03d}/standard.nii.gz"} for i in range(3)]
    assert case_names(same_stem) == ["case_000_standard", "case_001_standard", "case_002_standard"]
    with_ids = [
        {"image": "a/standard.nii.gz", "case_id": "p1"},
        {"image": "b/standard.nii.gz", "case_id": "p2"},
    ]
    assert case_names(with_ids) == ["p1", "p2"]
    assert case_names([{"image": "x/img.nii.gz"}, {"image": "x/img.nii"}]) == ["x_img", "x_img_2"]
    assert case_names([{"image": "img0.nii.gz"}, {"image": "img1.nii.gz"}]) == ["img0", "img1"]


def test_augment_refuses_to_overwrite_its_input_manifest(tmp_path, capsys):
    import json

    import numpy as np

    from medfusion.cli import main
    from medfusion.io.nifti import write_nifti

    write_nifti(tmp_path / "img0.nii.gz", np.zeros((32, 32), np.float32), np.eye(4))
    write_nifti(tmp_path / "lab0.nii.gz", np.zeros((32, 32), np.int16), np.eye(4))
    doc = {"task": "segment", "training": [{"image": "img0.nii.gz", "label": "lab0.nii.gz"}]}
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    args = ["augment", "--input", str(tmp_path / "manifest.json"), "--n", "1", "--output", str(tmp_path)]
    assert main(args) == 2
    assert "is the input manifest" in capsys.readouterr().err
    assert json.loads((tmp_path / "manifest.json").read_text()) == doc  # input untouched
