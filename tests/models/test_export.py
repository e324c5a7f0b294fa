"""Export (safetensors + YAML) and loading of medfusion LightningModules without pickle."""

from __future__ import annotations

import shutil

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from medfusion import keys
from medfusion.models.diffusion_ct import DenoiserConfig, DiffusionCT, DiffusionCTAutoencoder, SamplingConfig
from medfusion.models.export import WEIGHTS, export_model, load_model, weights_sha256

AE_KW = dict(channels=(8, 16), latent_channels=2, norm_num_groups=4)


def _batch(n=4, size=32):
    g = torch.Generator().manual_seed(0)
    t = torch.rand(n, 1, size, size, generator=g) * 2 - 1
    return {keys.SOURCE: t + 0.1 * torch.randn(t.shape, generator=g), keys.TARGET: t}


@pytest.fixture
def stage1(tmp_path):
    torch.manual_seed(0)
    ae = DiffusionCTAutoencoder(spatial_dims=2, **AE_KW)
    ae.calibrate_latent_scale([_batch()])
    export_model(ae, tmp_path / "stage1")
    return ae, tmp_path / "stage1"


def test_autoencoder_round_trip_equal_outputs(stage1):
    ae, path = stage1
    assert sorted(p.name for p in path.iterdir()) == ["config.yaml", "model.safetensors"]
    loaded = load_model(path)
    x = _batch()[keys.SOURCE]
    torch.testing.assert_close(loaded.reconstruct(x), ae.eval().reconstruct(x), rtol=0, atol=0)
    assert float(loaded.latent_scale) == float(ae.latent_scale) != 1.0


def test_diffusion_ct_export_is_self_contained(stage1, tmp_path):
    _, path = stage1
    torch.manual_seed(0)
    model = DiffusionCT(
        autoencoder=str(path), denoiser=DenoiserConfig(channels=(16, 32), num_head_channels=8, norm_num_groups=8),
        sampling=SamplingConfig(num_steps=2), ema_decay=0.5,
    )  # fmt: skip
    batch = _batch()
    loss = model.loss(batch)
    loss.backward()
    torch.optim.SGD(model.net.parameters(), lr=0.1).step()
    model.ema.update_parameters(model.net)
    model.ema.update_parameters(model.net)
    export_model(model, tmp_path / "stage2")
    shutil.rmtree(path)  # stage-1 weights travel inside the stage-2 export
    cfg = yaml.safe_load((tmp_path / "stage2" / "config.yaml").read_text())
    assert cfg["class_path"] == "medfusion.models.diffusion_ct.DiffusionCT"
    assert cfg["init_args"]["autoencoder_config"]["class_path"].endswith("DiffusionCTAutoencoder")
    loaded = load_model(tmp_path / "stage2")
    x = batch[keys.SOURCE][:2]
    a = model.standardize(x, generator=torch.Generator().manual_seed(1))
    b = loaded.standardize(x, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # EMA and raw weights both survive
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_lightning_checkpoint_loads_with_weights_only(stage1, tmp_path):
    ae, _ = stage1
    data = [{k: v[i] for k, v in _batch().items()} for i in range(4)]
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(ae, DataLoader(data, batch_size=2), DataLoader(data, batch_size=2))
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    torch.load(tmp_path / "a.ckpt", weights_only=True)  # plain data: no pickled classes
    loaded = load_model(tmp_path / "a.ckpt")
    x = _batch()[keys.SOURCE]
    torch.testing.assert_close(loaded.reconstruct(x), ae.eval().reconstruct(x), rtol=0, atol=0)
    # `medfusion export` turns the checkpoint into the pickle-free folder, with the same outputs; never overwrites
    from medfusion.cli import main

    assert main(["export", "--ckpt", str(tmp_path / "a.ckpt"), "--output", str(tmp_path / "exp")]) == 0
    torch.testing.assert_close(
        load_model(tmp_path / "exp").reconstruct(x), loaded.reconstruct(x), rtol=0, atol=0
    )
    assert main(["export", "--ckpt", str(tmp_path / "a.ckpt"), "--output", str(tmp_path / "exp")]) == 2
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    assert main(["export", "--ckpt", str(tmp_path / "bad.ckpt"), "--output", str(tmp_path / "exp2")]) == 2
    assert not (tmp_path / "exp2").exists()


def test_refuses_foreign_classes_and_overwrite(stage1, tmp_path):
    ae, path = stage1
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    (bad / "config.yaml").write_text(
        yaml.safe_dump({"class_path": "os.system", "init_args": {"command": "true"}})
    )
    with pytest.raises(ValueError, match="medfusion.models"):
        load_model(bad)

    class Foreign(L.LightningModule):
        pass

    with pytest.raises(ValueError, match="medfusion.models"):
        export_model(Foreign(), tmp_path / "foreign")
    with pytest.raises(FileExistsError):
        export_model(ae, path)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nothing")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="neither"):
        load_model(tmp_path / "x.txt")


def test_loads_weights_saved_from_a_compiled_module(stage1, tmp_path):
    """``torch.compile`` prefixes keys with ``_orig_mod.``; loading must not care."""
    from safetensors.torch import load_file, save_file

    ae, path = stage1
    compiled = tmp_path / "compiled"
    shutil.copytree(path, compiled)
    state = load_file(str(compiled / "model.safetensors"))
    save_file(
        {k.replace("net.", "net._orig_mod.", 1): v for k, v in state.items()},
        str(compiled / "model.safetensors"),
    )
    x = _batch()[keys.SOURCE]
    torch.testing.assert_close(load_model(compiled).reconstruct(x), ae.eval().reconstruct(x), rtol=0, atol=0)


def test_weights_sha256_names_the_weights_not_the_folder(stage1, tmp_path):
    """The hash recorded beside reported figures: the safetensors bytes of a folder (the config does not count), the
    file itself for a checkpoint; different weights give a different hash."""
    import hashlib

    ae, folder = stage1
    digest = weights_sha256(folder)
    assert digest == hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()
    assert weights_sha256(folder / WEIGHTS) == digest
    (folder / "config.yaml").write_text((folder / "config.yaml").read_text() + "\n# a comment\n")
    assert weights_sha256(folder) == digest
    with torch.no_grad():
        next(ae.parameters()).add_(1.0)
    export_model(ae, tmp_path / "changed")
    assert weights_sha256(tmp_path / "changed") != digest
    with pytest.raises(FileNotFoundError):
        weights_sha256(tmp_path / "missing")
