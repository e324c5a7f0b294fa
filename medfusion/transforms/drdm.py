"""DRDM deformation augmentation as MONAI transforms: ``RandDRDMDeform`` (array) and ``RandDRDMDeformd`` (dict).

Zheng et al., DRDM, arXiv 2407.07295: generate a diverse, large and plausible deformation of each instance
(Algorithm 2: random forward field ``Phi_{T'}`` then recovery by a trained net) and warp its labels with
the same field. Without a trained net the transform is the forward process alone (a random field at level
``T'``, the baseline the paper compares against). MONAI contract: randomness only through ``self.R`` in
``randomize()`` (a level ``T'`` and a seed), then a deterministic core seeded from them, so a result is
reproducible from ``set_random_state``; the transforms are ``Randomizable``, so ``CacheDataset`` caches
everything before them. Fields are built on the data's device (GPU when the data is on GPU).

Fields: ``(D, *spatial)`` in voxels, array-axis order, pull convention (``medfusion.fields``). Images are
warped bilinearly (zeros padding) and labels by ``nearest`` or ``onehot`` (one-hot + linear + argmax), both
keeping the original, possibly non-contiguous, label values. Each call records the folding fraction of its
field (share of voxels with det J <= 0, on the reference grid) in ``last_folding``. In the dict transform, keys
on another grid than the first key (``MetaTensor`` affines differ) get the same world-space (mm) displacement,
resampled to their own grid (``medfusion.fields.world``); their outputs keep their own grid and metadata.

Weights: ``recovery_net`` is an ``nn.Module``, or a path to exported weights: a folder written by
``medfusion.models.export.export_model`` (``model.safetensors`` + ``config.yaml``, keys ``recovery_net.*``)
or a ``.safetensors`` file holding a ``DRDMRecoveryNet`` state dict. The transform layer never imports
``medfusion.models``; it rebuilds the net from the weights (spatial dims from the last conv's rank).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_dst_type, convert_to_tensor
from torch import nn

from medfusion.diffusion.deformation import DeformationDiffusion, recover, recovery_schedule
from medfusion.fields import folding_fraction, warp, warp_labels
from medfusion.fields.warp import InterpMode, PaddingMode
from medfusion.fields.world import resample_field, same_grid
from medfusion.nets.drdm import DRDMRecoveryNet

Mode = Literal["bilinear", "nearest", "bicubic", "onehot"]
MODES: tuple[str, ...] = ("bilinear", "nearest", "bicubic", "onehot")
PADDINGS: tuple[str, ...] = ("zeros", "border", "reflection")


def load_recovery_net(path: str | Path) -> DRDMRecoveryNet:
    """Build a ``DRDMRecoveryNet`` from exported weights (export folder or ``.safetensors`` state dict)."""
    from safetensors.torch import load_file

    path = Path(path)
    config: dict[str, Any] = {}
    if path.is_dir():
        cfg = path / "config.yaml"
        if cfg.is_file():
            import yaml

            config = dict((yaml.safe_load(cfg.read_text()) or {}).get("init_args") or {})
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"recovery-net weights not found: {path}")
    state = load_file(str(path))
    if any(k.startswith("recovery_net.") for k in state):
        state = {k[len("recovery_net.") :]: v for k, v in state.items() if k.startswith("recovery_net.")}
    if "head.weight" not in state:
        raise ValueError(f"{path} does not hold DRDMRecoveryNet weights (no 'head.weight')")
    net = DRDMRecoveryNet(
        spatial_dims=state["head.weight"].ndim - 2,
        in_channels=state["te1.net.2.weight"].shape[0],
        time_steps=int(config.get("timesteps", 80)),
        recursion=int(config.get("recursion", 2)),
    )
    net.load_state_dict(state, strict=True)
    return net.eval()


class RandDRDMDeform(RandomizableTransform):
    """Randomly deform an image (C, *spatial) with a DRDM-generated field.

    Args:
        prob: probability of deforming.
        t_range: inclusive range of levels ``T'`` drawn per call (40-48 keep folding < 1% for the official
            2D model; higher is larger and less plausible).
        recovery_net: trained recovery net (module or path to exported weights); None = forward process only.
        recovery_steps: recovery network calls (None = ``T'``, the paper's Algorithm 2; fewer = strided).
        mode: image interpolation, ``bilinear`` / ``nearest`` / ``bicubic`` (2D).
        padding_mode: image padding (zeros as DRDM).
        sampler_padding: padding when accumulating the field in the sampler.
        sigma, ctl_size, legacy_scale: forward-process parameters (``DeformationDiffusion``).
    """

    def __init__(
        self,
        prob: float = 1.0,
        t_range: tuple[int, int] = (40, 48),
        recovery_net: nn.Module | str | Path | None = None,
        recovery_steps: int | None = None,
        mode: InterpMode = "bilinear",
        padding_mode: PaddingMode = "zeros",
        sampler_padding: PaddingMode = "border",
        sigma: float = 4e-5,
        ctl_size: int = 64,
        legacy_scale: bool = False,
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        lo, hi = (int(v) for v in t_range)
        if not 0 <= lo <= hi <= 80:
            raise ValueError(f"t_range must satisfy 0 <= low <= high <= 80, got {t_range}")
        if mode not in MODES[:3]:
            raise ValueError(f"mode={mode!r} is not valid for images; choose one of {', '.join(MODES[:3])}")
        for name, value in (("padding_mode", padding_mode), ("sampler_padding", sampler_padding)):
            if value not in PADDINGS:
                raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(PADDINGS)}")
        if isinstance(recovery_net, (str, Path)):
            recovery_net = load_recovery_net(recovery_net)
        self.t_range = (lo, hi)
        self.net = recovery_net.eval() if recovery_net is not None else None
        self.recovery_steps = recovery_steps
        self.mode = mode
        self.padding_mode = padding_mode
        self.sampler_padding = sampler_padding
        self.process = DeformationDiffusion(sigma=sigma, ctl_size=ctl_size, legacy_scale=legacy_scale)
        self._t_start = lo
        self._seed = 0
        self.last_ddf: torch.Tensor | None = None
        self.last_folding: float | None = None

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self._t_start = int(self.R.randint(self.t_range[0], self.t_range[1] + 1))
        self._seed = int(self.R.randint(0, 2**31 - 1))

    @torch.no_grad()
    def generate_field(self, img: Any) -> torch.Tensor:
        """The field (D, *spatial) in voxels for the current draw (deterministic given ``randomize``'s draw)."""
        x = convert_to_tensor(img, track_meta=False).float()[None]
        nd = x.ndim - 2
        gen = torch.Generator().manual_seed(self._seed)
        t = torch.full((1,), max(self._t_start, 0))
        ddf = self.process.fields(t, x.shape[2:], with_psi=False, generator=gen, device=x.device).phi
        if self.net is not None and self._t_start >= 1:
            if self.net.spatial_dims != nd:
                raise ValueError(
                    f"recovery net is {self.net.spatial_dims}D but the image has {nd} spatial dims"
                )
            net = self.net.to(x.device)
            schedule = recovery_schedule(min(self._t_start, 80), self.recovery_steps)
            ddf = recover(
                lambda y, tt: net(y[:, :1], tt), x, ddf, schedule, padding_mode=self.sampler_padding
            ).ddf
        return ddf[0]

    def apply(self, img: Any, ddf: torch.Tensor, mode: Mode | None = None) -> Any:
        """Warp ``img`` (C, *spatial) with ``ddf`` (D, *spatial); ``mode`` in bilinear/nearest/bicubic/onehot."""
        mode = mode or self.mode
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not valid; choose one of {', '.join(MODES)}")
        x = convert_to_tensor(img, track_meta=False)
        field = ddf[None].to(x.device)
        if (
            mode in ("nearest", "onehot")
            and x.shape[0] == 1
            and (mode == "onehot" or not x.is_floating_point())
        ):
            out = warp_labels(x[None], field, mode=mode)[0]
        elif mode == "onehot":
            raise ValueError(f"mode='onehot' needs a one-channel label map, got shape {tuple(x.shape)}")
        else:
            src = x[None] if x.is_floating_point() else x[None].float()
            out = warp(src, field.to(src.dtype), mode=mode, padding_mode=self.padding_mode)[0]
            if not x.is_floating_point():
                out = out.round()
        return convert_to_dst_type(out, dst=img, dtype=img.dtype if hasattr(img, "dtype") else None)[0]

    def __call__(self, img: Any, mode: str | None = None, randomize: bool = True) -> Any:
        if randomize:
            self.randomize()
        if not self._do_transform:
            self.last_ddf, self.last_folding = None, None
            return img
        ddf = self.generate_field(img)
        self.last_ddf = ddf
        self.last_folding = float(folding_fraction(ddf[None])[0])
        return self.apply(img, ddf, mode)


class RandDRDMDeformd(RandomizableTransform, MapTransform):
    """Dictionary version: one DRDM field per call, shared by all ``keys``.

    The field is generated on the grid of the first key present (the image; the net sees its first channel).
    Keys on another grid (a label with other spacing, origin, orientation or size; ``MetaTensor``s with affines)
    are warped by the same displacement in world space (mm), carried to their grid by
    :func:`medfusion.fields.world.resample_field`; keys on the same grid use the field as
    is. Plain tensors / arrays of a different spatial shape raise ``ValueError`` (no affine to relate them).
    ``mode``: one entry per key (or one for all), from ``bilinear`` / ``nearest`` / ``bicubic`` / ``onehot``;
    use ``nearest`` or ``onehot`` for labels. Default: ``bilinear`` for the first key, ``nearest`` for the others. ``ddf_key``: if given, the field (D, *spatial) in voxels is
    stored under it and its folding fraction under ``f"{ddf_key}_folding"``. Other arguments as
    ``RandDRDMDeform``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        mode: Mode | Sequence[Mode] | None = None,
        prob: float = 1.0,
        t_range: tuple[int, int] = (40, 48),
        recovery_net: nn.Module | str | Path | None = None,
        recovery_steps: int | None = None,
        padding_mode: PaddingMode = "zeros",
        sampler_padding: PaddingMode = "border",
        sigma: float = 4e-5,
        ctl_size: int = 64,
        legacy_scale: bool = False,
        ddf_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if mode is None:
            modes = ["bilinear"] + ["nearest"] * (len(self.keys) - 1)
        else:
            modes = [mode] * len(self.keys) if isinstance(mode, str) else list(mode)
        if len(modes) != len(self.keys):
            raise ValueError(f"mode needs one entry per key ({len(self.keys)}), got {modes}")
        for m in modes:
            if m not in MODES:
                raise ValueError(f"mode={m!r} is not valid; choose one of {', '.join(MODES)}")
        self.mode = modes
        self.ddf_key = ddf_key
        self.rand = RandDRDMDeform(
            prob=1.0,
            t_range=t_range,
            recovery_net=recovery_net,
            recovery_steps=recovery_steps,
            mode="bilinear",
            padding_mode=padding_mode,
            sampler_padding=sampler_padding,
            sigma=sigma,
            ctl_size=ctl_size,
            legacy_scale=legacy_scale,
        )

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.rand.set_random_state(seed, state)
        return self

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self.rand.randomize()

    @property
    def last_folding(self) -> float | None:
        return self.rand.last_folding

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            self.rand.last_ddf, self.rand.last_folding = None, None
            return d
        present = [k for k in self.key_iterator(d)]
        if not present:
            return d
        ddf = self.rand.generate_field(d[present[0]])
        self.rand.last_ddf = ddf
        self.rand.last_folding = float(folding_fraction(ddf[None])[0])
        d = self.apply_field(d, ddf)
        if self.ddf_key is not None:
            d[self.ddf_key] = ddf
            d[f"{self.ddf_key}_folding"] = self.rand.last_folding
        return d

    def apply_field(self, data: Mapping[Hashable, Any], ddf: torch.Tensor) -> dict[Hashable, Any]:
        """Warp every present key with ``ddf`` (D, *spatial), voxels of the first present key's grid.

        The deterministic core of ``__call__`` (the random part only draws ``ddf``). A key on the same grid
        (same spatial shape, and the same affine where both are ``MetaTensor``s) is warped with ``ddf`` itself.
        A key on another grid gets the same world-space (mm) displacement, resampled to its grid with
        :func:`medfusion.fields.world.resample_field` (both keys must be ``MetaTensor``s with an affine).
        Outputs keep their own grid and metadata.

        Raises:
            ValueError: a key's spatial shape differs from the reference key's and one of them has no affine.
        """
        d = dict(data)
        present = [k for k in self.key_iterator(d)]
        if not present:
            return d
        ref_key = present[0]
        ref = d[ref_key]
        nd = ddf.shape[0]
        for key, mode in zip(self.keys, self.mode):
            if key not in d:
                continue
            field = self._field_for(key, d[key], ref_key, ref, ddf, nd)
            d[key] = self.rand.apply(d[key], field, mode)
        return d

    @staticmethod
    def _field_for(
        key: Hashable, img: Any, ref_key: Hashable, ref: Any, ddf: torch.Tensor, nd: int
    ) -> torch.Tensor:
        """``ddf`` carried to ``img``'s grid (itself when the grids agree)."""
        if img is ref:
            return ddf
        shape, ref_shape = tuple(img.shape[1:]), tuple(ref.shape[1:])
        has_affine = isinstance(img, MetaTensor) and isinstance(ref, MetaTensor)
        if not has_affine:
            if shape != ref_shape:
                raise ValueError(
                    f"key {key!r} has spatial shape {shape} but the reference key {ref_key!r} has {ref_shape}; "
                    "carrying the field to another grid needs an affine on both: pass MONAI MetaTensors "
                    "(e.g. from LoadImaged) or resample them to one grid first"
                )
            return ddf
        if shape == ref_shape and same_grid(ref.affine, img.affine, nd):
            return ddf
        return resample_field(ddf[None], ref.affine, img.affine, shape)[0]
