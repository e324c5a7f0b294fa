"""``medfusion export``: the exported folder infers with the weight average, or with the raw weights (``--raw``)."""

from __future__ import annotations

import torch

from medfusion.cli import main
from medfusion.exit_codes import EXIT_NOTHING_DONE, EXIT_OK
from medfusion.models.export import export_model, load_model
from medfusion.models.rddm import RDDM


def _params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_raw_exports_the_raw_weights_and_the_default_the_average(tmp_path, capsys):
    torch.manual_seed(0)
    model = RDDM(
        spatial_dims=2, ema_decay=0.9, ema_every=1,
        unet={"channels": (8, 8), "attention_levels": (False, False), "num_head_channels": 8, "norm_num_groups": 4},
    )  # fmt: skip
    model.ema.update_parameters(model.averaged(use_ema=False))  # the average = the weights of now
    with torch.no_grad():
        for p in model.nets.parameters():
            p.add_(1.0)  # then the raw weights move on
    raw, average = _params(model.averaged(use_ema=False)), _params(model.averaged())
    export_model(model, tmp_path / "model")
    for name, extra, expected in (("avg", [], average), ("raw", ["--raw"], raw)):
        rc = main(["export", "--ckpt", str(tmp_path / "model"), "--output", str(tmp_path / name), *extra])
        assert rc == EXIT_OK, capsys.readouterr().err
        for got, want in zip(_params(load_model(tmp_path / name).averaged()), expected):
            torch.testing.assert_close(got, want)
    assert main(["export", "--ckpt", str(tmp_path / "model"), "--output", str(tmp_path / "raw")]) == EXIT_NOTHING_DONE
    assert "refusing to overwrite" in capsys.readouterr().err
