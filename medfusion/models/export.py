"""Export and load medfusion LightningModules without pickle.

An exported model is a folder::

    model.safetensors   every tensor of ``module.state_dict()`` (raw and EMA weights, buffers such as the latent
                        scale, and for DiffusionCT the frozen stage-1 weights under ``autoencoder.*``)
    config.yaml         ``class_path`` + ``init_args`` (the module's hyper-parameters), i.e. the constructor is the config
    dpm_v3_stats.safetensors  optional: DPM-Solver-v3's statistics of these weights
                        (:func:`medfusion.models.dpm_v3_stats.compute_model_ems`), loaded into ``module.dpm_v3_stats``;
                        :func:`export_model` does not write them (they belong to the weights they were computed on)

:func:`load_model` reads such a folder, or a Lightning ``.ckpt`` with ``torch.load(weights_only=True)``; in both cases
the class is rebuilt from its init args and the weights are loaded strictly. Only classes under
``medfusion.models.`` are accepted: a config naming another class is refused, so a config file cannot make us import
and run arbitrary code. Written here because Lightning checkpoints are pickles and ``safetensors`` stores tensors only.
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path
from typing import Any

import torch

from medfusion.io.atomic import atomic_dir

ALLOWED_PREFIX = "medfusion.models."
WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
CKPT_CLASS_KEY = (
    "medfusion_class_path"  # written into Lightning checkpoints by our modules' on_save_checkpoint
)


def class_path(obj_or_cls: Any) -> str:
    """``module.QualName`` of an object or class."""
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    return f"{cls.__module__}.{cls.__qualname__}"


def _plain(value: Any) -> Any:
    """Hyper-parameters as YAML-safe plain types (tuples become lists)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"hyper-parameter value {value!r} ({type(value).__name__}) cannot be exported as YAML")


def module_config(module: Any) -> dict[str, Any]:
    """``{"class_path", "init_args"}`` of a LightningModule built with ``save_hyperparameters()``."""
    hparams = dict(getattr(module, "hparams", {}) or {})
    init_args = {k: _plain(v) for k, v in hparams.items() if not str(k).startswith("_")}
    return {"class_path": class_path(module), "init_args": init_args}


def _resolve(path: str) -> type:
    if not isinstance(path, str) or not path.startswith(ALLOWED_PREFIX):
        raise ValueError(
            f"refusing to load class {path!r}: only classes under {ALLOWED_PREFIX!r} can be loaded"
        )
    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import model class {path!r}: {err}") from err
    if not isinstance(cls, type):
        raise ValueError(f"{path!r} is not a class")
    return cls


def build_from_config(config: dict[str, Any]) -> Any:
    """Instantiate ``config["class_path"](**config["init_args"])`` (weights as initialised)."""
    if not isinstance(config, dict) or "class_path" not in config:
        raise ValueError(f"model config must be a mapping with 'class_path' and 'init_args', got {config!r}")
    cls = _resolve(config["class_path"])
    init_args = dict(config.get("init_args") or {})
    upgrade = getattr(cls, "upgrade_config", None)  # models exported by an earlier version (MedfusionModule)
    if upgrade is not None:
        init_args = upgrade(init_args)
    # LightningCLI instantiates a model inside a context that makes *every* save_hyperparameters() call record the
    # CLI's init args; a module built here inside another module's __init__ (DiffusionCT's stage 1) must record its
    # own. Lightning exposes no public switch, so the context variable is cleared for the nested construction.
    try:
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:  # pragma: no cover - other Lightning versions
        return cls(**init_args)
    token = _given_hyperparameters.set(None)
    try:
        return cls(**init_args)
    finally:
        _given_hyperparameters.reset(token)


def export_model(module: Any, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write ``module`` to ``out_dir`` as ``model.safetensors`` + ``config.yaml`` (atomic; never overwrites by default)."""
    import yaml
    from safetensors.torch import save_file

    config = module_config(module)
    _resolve(config["class_path"])  # refuse non-medfusion modules before writing anything
    state = {k: v.detach().cpu().contiguous().clone() for k, v in _plain_keys(module.state_dict()).items()}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt", "class_path": config["class_path"]})
        (tmp / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    return Path(out_dir)


def weights_sha256(path: str | Path) -> str:
    """SHA-256 of a model's weights: ``model.safetensors`` of an exported folder, or the ``.ckpt`` file itself.

    Recorded beside reported figures so that each names the exact weights that produced it."""
    p = Path(path)
    f = p / WEIGHTS if p.is_dir() else p
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load an exported folder (or its ``config.yaml`` / ``model.safetensors``) or a Lightning ``.ckpt``; eval mode.

    Modules that average weights keep the average inside them (``ema.module.*``), so both are loaded and the
    module's own inference uses the average.

    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` for anything that is not a medfusion model.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    if path.is_file() and path.name in (WEIGHTS, CONFIG):
        path = path.parent
    if path.is_dir():
        return _load_exported(path, map_location)
    if path.suffix == ".ckpt":
        return _load_checkpoint(path, map_location)
    raise ValueError(
        f"{path} is neither an exported model folder ({WEIGHTS} + {CONFIG}) nor a Lightning .ckpt"
    )


def _plain_keys(state: dict[str, Any]) -> dict[str, Any]:
    """Drop the ``_orig_mod.`` segment that ``torch.compile`` adds, so compiled and eager weights load alike."""
    return {k.replace("._orig_mod.", ".").removeprefix("_orig_mod."): v for k, v in state.items()}


def _load_exported(folder: Path, map_location: str | torch.device) -> Any:
    import yaml
    from safetensors.torch import load_file

    cfg_path, w_path = folder / CONFIG, folder / WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise ValueError(f"{folder} is not an exported model: it needs {CONFIG} and {WEIGHTS}")
    try:
        config = yaml.safe_load(cfg_path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{cfg_path}: not valid YAML: {err}") from err
    module = _build(config, cfg_path)
    try:
        state = load_file(str(w_path), device=str(map_location))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for corrupt files
        raise ValueError(f"{w_path}: not a readable safetensors file ({type(err).__name__}: {err})") from err
    _load_state(module, state, w_path)
    stats = folder / "dpm_v3_stats.safetensors"  # medfusion.models.dpm_v3_stats.STATS_FILE
    if stats.is_file():
        from medfusion.diffusion.dpm_v3 import load_ems

        module.dpm_v3_stats = load_ems(stats)
    return module.eval()


def _build(config: Any, source: Path) -> Any:
    """:func:`build_from_config`, with errors that name the file the config came from."""
    try:
        return build_from_config(config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: cannot build the model from its config: {err}") from err


def _load_state(module: Any, state: dict[str, Any], source: Path) -> None:
    state = _plain_keys(state)
    upgrade = getattr(module, "upgrade_state_dict", None)  # weights saved by an earlier version (MedfusionModule)
    if upgrade is not None:
        state = upgrade(state)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"{source}: the weights do not match the model its config describes "
            f"({type(module).__name__}): {str(err)[:500]}"
        ) from err


def _load_checkpoint(path: Path, map_location: str | torch.device) -> Any:
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means: not a plain-data checkpoint
        raise ValueError(f"{path} could not be loaded with torch.load(weights_only=True): {err}") from err
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} holds a {type(ckpt).__name__}, not a Lightning checkpoint (a mapping)")
    hparams = dict(ckpt.get("hyper_parameters") or {})
    cls_path = ckpt.get(CKPT_CLASS_KEY) or hparams.get("_class_path")
    if cls_path is None:
        raise ValueError(
            f"{path} does not name its model class (no {CKPT_CLASS_KEY!r} or '_class_path' entry)"
        )
    init_args = {k: v for k, v in hparams.items() if not str(k).startswith("_")}
    module = _build({"class_path": cls_path, "init_args": init_args}, path)
    if "state_dict" not in ckpt:
        raise ValueError(f"{path} has no 'state_dict': not a Lightning checkpoint")
    _load_state(module, ckpt["state_dict"], path)
    return module.eval()
