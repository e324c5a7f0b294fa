"""How ``rddm_2d/`` and ``diffir_stage2_2d/`` of this folder were made: tiny RDDM and DiffIR stage-2 models exported
by medfusion 0.1.0 (flat constructor arguments, before issue 17 grouped them), and their outputs on a fixed input.
Kept as a record; it runs only against 0.1.0's ``medfusion.models.rddm`` / ``diffir`` (commit a6a28f8).

    python tests/models/data/legacy_v0_1/make_legacy_restorers.py

Each folder holds ``config.yaml`` + ``model.safetensors`` (``medfusion.models.export``); ``expected.safetensors``
holds a seeded input ``source`` and the model's ``restore`` output ``output`` (generator seeded with 7). The EMA was
updated once and the raw weights then perturbed, so equal outputs show that the EMA weights were loaded and used.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from medfusion.models.diffir import DiffIRStage1, DiffIRStage2
from medfusion.models.export import export_model
from medfusion.models.rddm import RDDM

HERE = Path(__file__).parent


def _ema_then_perturb(module, source: torch.nn.Module) -> None:
    module.ema.update_parameters(source)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.05 * torch.randn_like(p))


def _write(module, name: str, source: torch.Tensor) -> None:
    out = module.eval().restore(source, generator=torch.Generator().manual_seed(7))
    export_model(module, HERE / name, overwrite=True)
    tensors = {"source": source.contiguous(), "output": out.contiguous()}
    save_file(tensors, str(HERE / name / "expected.safetensors"))


def main() -> None:
    torch.manual_seed(0)
    source = torch.rand(2, 1, 16, 16) * 2 - 1
    rddm = RDDM(
        spatial_dims=2, channels=(4, 8), attention_levels=(False, True), num_head_channels=8,
        unet_kwargs={"norm_num_groups": 4}, num_sampling_steps=3, sw_batch_size=2, sw_overlap=0.5,
        val_num_samples=1, hu_window=(-160.0, 240.0),
    )  # fmt: skip
    _ema_then_perturb(rddm, rddm.nets)
    _write(rddm, "rddm_2d", source)

    tiny = dict(
        dim=4, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1, heads=(1, 1, 2, 2), cpen_downscale=2,
        n_feats=4, n_encoder_res=1, ffn_expansion_factor=1.0, val_num_samples=1, hu_window=(-160.0, 240.0),
    )  # fmt: skip
    s1 = DiffIRStage1(spatial_dims=2, **tiny)
    export_model(s1, HERE / "_stage1_tmp", overwrite=True)
    s2 = DiffIRStage2(stage1=str(HERE / "_stage1_tmp"), spatial_dims=2, encoder_steps=3, sw_batch_size=2, **tiny)
    _ema_then_perturb(s2, s2._student())
    _write(s2, "diffir_stage2_2d", source)
    shutil.rmtree(HERE / "_stage1_tmp")


if __name__ == "__main__":
    main()
