"""``medfusion demo``: CT standardization with DiffusionCT end to end on the built-in data.

DiffusionCT (Selim et al., "Latent Diffusion Model for Medical Image Standardization and Enhancement",
arXiv 2310.05237) maps a CT scan taken with any protocol (kernel, dose, slice thickness) to the look of a standard
protocol: a stage-1 autoencoder gives a latent space, a stage-2 conditional latent diffusion model maps the
source's latent to the standard scan's. The demo:

1. writes the built-in phantom dataset (``medfusion.data.builtin.make_dataset``; 2D);
2. trains stage 1 (autoencoder on every protocol) and stage 2 (conditional latent DDPM, stage 1 frozen) with a
   Lightning ``Trainer`` for a fixed number of steps (:class:`DemoBudget`, a YAML file: ``configs/demo/cpu.yaml``
   sized to finish in about 10 minutes at the slowest CPU step rate measured, ``cuda.yaml`` on a GPU,
   ``quick.yaml`` for ``--quick``, or ``--budget PATH``), so that the result does not depend on the machine's
   speed. Each stage's ``minutes`` is only a safety stop: when it fires, the demo says so and marks the run
   ``short`` in ``metrics.json``;
3. chooses the output it shows on the validation patients: the DDPM sample or, with the regression U-Net, its
   posterior mean (``mean_only``), whichever comes closer to the standard scan (PSNR over the body), and says
   which and why; it standardizes the held-out test patients with it (NIfTI outputs under ``standardized/``);
4. scores identity (the raw input), the stage-1 passthrough ``decode(encode(source))``, the sample with either
   decoding (``diffusion_ct``, ``diffusion_ct_latent``: the paper's ``D(z_hat)``) and the posterior mean
   (``diffusion_ct_mean``) on the test patients with :func:`medfusion.eval.report.evaluate` (``evaluation/``:
   means with 95% patient-bootstrap intervals, paired differences against the raw input, ``cases.csv``, figures);
5. writes ``metrics.json`` and ``figure.png`` (source / shown output / reference / difference per protocol, axial
   slices in radiological orientation) and prints the intervals.

``--quick`` runs the same pipeline at toy size (a few seconds; used by the tests): its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np

DISPLAY_WINDOW = (-160.0, 240.0)  # soft-tissue window (W 400 / L 40) for the figure
BUDGET_DIR = Path(__file__).resolve().parents[2] / "configs" / "demo"
BUDGETS = ("quick", "cpu", "cuda")


# ------------------------------------------------------------------------------------------- budget
@dataclass(frozen=True)
class DataBudget:
    """Built-in dataset and training crops. ``workers``: at most this many loader workers (capped at CPUs - 2)."""

    patients: int
    size: int
    crop: int
    crop_foreground: bool
    workers: int


@dataclass(frozen=True)
class Stage1Budget:
    """DiffusionCT autoencoder (our skip-capable encoder-decoder) and its training steps / minutes guard."""

    channels: tuple[int, ...]
    latent_channels: int
    norm_groups: int
    skip_from_level: int
    shortcuts: bool
    lr: float
    ssim_weight: float
    steps: int
    batch: int
    minutes: float


@dataclass(frozen=True)
class Stage2Budget:
    """Conditional latent DDPM (denoiser U-Net, optional regression U-Net) and its training budget."""

    channels: tuple[int, ...]
    attention_levels: tuple[bool, ...]
    norm_groups: int
    head_channels: int
    regression: bool
    regression_channels: tuple[int, ...]
    regression_lr: float | None
    pixel_shuffle: int
    lr: float
    ema_decay: float
    steps: int
    batch: int
    minutes: float


@dataclass(frozen=True)
class SamplingBudget:
    """Sampler of the exported model and its decoding (``residual`` or the paper's ``latent``)."""

    sampler: str
    steps: int
    decode: Literal["residual", "latent"]
    residual_sigma: float


@dataclass(frozen=True)
class DemoBudget:
    """Sizes and training budget of one demo run (one YAML file; recorded in ``metrics.json``)."""

    data: DataBudget
    stage1: Stage1Budget
    stage2: Stage2Budget
    sampling: SamplingBudget

    def __post_init__(self) -> None:
        if self.sampling.decode not in ("residual", "latent"):
            raise ValueError(f"sampling.decode must be 'residual' or 'latent', got {self.sampling.decode!r}")


def _group(cls: type, doc: Any, where: str) -> Any:
    names = [f.name for f in fields(cls)]
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: expected a mapping with keys {names}, got {type(doc).__name__}")
    unknown, missing = sorted(set(doc) - set(names)), [n for n in names if n not in doc]
    if unknown or missing:
        raise ValueError(f"{where}: unknown keys {unknown}, missing keys {missing}; valid keys: {names}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in doc.items()})


def load_budget(path: str | Path) -> DemoBudget:
    """:class:`DemoBudget` from a YAML file with the groups ``data``, ``stage1``, ``stage2``, ``sampling``."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"demo budget {path} does not exist")
    doc = yaml.safe_load(path.read_text()) or {}
    groups = {"data": DataBudget, "stage1": Stage1Budget, "stage2": Stage2Budget, "sampling": SamplingBudget}
    if not isinstance(doc, dict) or set(doc) != set(groups):
        raise ValueError(f"{path}: needs exactly the groups {list(groups)}, got {list(doc) if isinstance(doc, dict) else doc!r}")
    return DemoBudget(**{g: _group(cls, doc[g], f"{path}: {g}") for g, cls in groups.items()})


def default_budget(quick: bool, cuda: bool) -> Path:
    """``configs/demo/quick.yaml`` with ``quick``, else ``cuda.yaml`` on a GPU, else ``cpu.yaml``."""
    return BUDGET_DIR / f"{'quick' if quick else 'cuda' if cuda else 'cpu'}.yaml"


def loader_workers(budget: DemoBudget) -> int:
    """The budget's worker count, capped at the CPU count minus 2 (the main process and the accelerator feed)."""
    return min(budget.data.workers, max(0, (os.cpu_count() or 1) - 2))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, help="demo folder (data, models, outputs, figure, metrics)")
    parser.add_argument("--quick", action="store_true", help="toy sizes: runs in seconds (numbers meaningless)")
    parser.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda")
    parser.add_argument(
        "--budget", default=None,
        help="budget YAML (default: configs/demo/cpu.yaml, cuda.yaml on a GPU, quick.yaml with --quick)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of data, training and sampling")
    parser.add_argument("--overwrite", action="store_true", help="reuse a non-empty output folder")


# ------------------------------------------------------------------------------------------- steps
def _trainer(steps: int, minutes: float, device, root: Path, quick: bool):
    import lightning as L

    from medfusion.models.progress import step_progress_bar_class

    return L.Trainer(
        max_steps=steps, max_time={"minutes": minutes}, accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=not quick, limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(root),
        precision="bf16-mixed" if device.type == "cuda" else "32-true",
        callbacks=[] if quick else [step_progress_bar_class()()],  # "Epoch 3 (step budget 650)", not "Epoch 3/-2"
    )  # fmt: skip


def _datamodule(manifest: Path, b: DemoBudget, batch: int, seed: int):
    from medfusion.data.datamodule import ManifestDataModule

    workers = loader_workers(b)
    return ManifestDataModule(
        str(manifest), task="standardize", spatial_dims=2, roi_size=[b.data.crop, b.data.crop], num_samples=1,
        batch_size=batch, cache="memory", seed=seed, crop_foreground=b.data.crop_foreground, num_workers=workers,
        persistent_workers=workers > 0,
    )  # fmt: skip


def train_stage1(manifest: Path, b: DemoBudget, dev, output: Path, seed: int, quick: bool) -> tuple[Any, int]:
    """Train and export the autoencoder (``output/models/stage1``); returns it and the steps done."""
    from medfusion.models.diffusion_ct_autoencoder import DiffusionCTAutoencoder
    from medfusion.models.export import export_model

    s1 = b.stage1
    ae = DiffusionCTAutoencoder(
        spatial_dims=2, architecture="skip", channels=s1.channels, latent_channels=s1.latent_channels,
        norm_num_groups=s1.norm_groups, skip_from_level=s1.skip_from_level, shortcuts=s1.shortcuts,
        ssim_weight=s1.ssim_weight, kl_weight=1e-6, lr=s1.lr,
    )  # fmt: skip
    dm = _datamodule(manifest, b, s1.batch, seed)
    trainer = _trainer(s1.steps, s1.minutes, dev, output, quick)
    trainer.fit(ae, datamodule=dm)
    ae.calibrate_latent_scale(dm.train_dataloader(), max_batches=50)
    export_model(ae.cpu(), output / "models" / "stage1", overwrite=True)
    return ae, int(trainer.global_step)


def train_stage2(manifest: Path, b: DemoBudget, dev, output: Path, seed: int, quick: bool) -> tuple[Any, int]:
    """Train and export the conditional latent DDPM on the exported stage 1 (``output/models/diffusion_ct``)."""
    from medfusion.models.diffusion_ct import DenoiserConfig, DiffusionCT, RegressionConfig, SamplingConfig
    from medfusion.models.export import export_model

    s2, smp = b.stage2, b.sampling
    denoiser = DenoiserConfig(
        channels=s2.channels, attention_levels=s2.attention_levels, num_head_channels=s2.head_channels,
        norm_num_groups=s2.norm_groups,
    )  # fmt: skip
    regression = RegressionConfig(channels=s2.regression_channels, lr=s2.regression_lr) if s2.regression else None
    sampling = SamplingConfig(
        sampler=smp.sampler, num_steps=smp.steps, decode=smp.decode, residual_sigma=smp.residual_sigma
    )
    model = DiffusionCT(
        autoencoder=str(output / "models" / "stage1"), mode="conditional", denoiser=denoiser, prediction="v",
        residual=True, regression=regression, pixel_shuffle=s2.pixel_shuffle, sampling=sampling, lr=s2.lr,
        ema_decay=s2.ema_decay, seed=seed,
    )  # fmt: skip
    trainer = _trainer(s2.steps, s2.minutes, dev, output, quick)
    trainer.fit(model, datamodule=_datamodule(manifest, b, s2.batch, seed))
    export_model(model.cpu(), output / "models" / "diffusion_ct", overwrite=True)
    return model, int(trainer.global_step)


def demo_methods(model: Any, b: DemoBudget, dev, seed: int) -> dict[str, Any]:
    """The scored rows: ``{name: fn(source HU, protocol) -> output HU}`` (each sample seeded with ``seed``)."""
    import torch

    from medfusion.apps.volume_job import apply_to_array

    other = "latent" if b.sampling.decode == "residual" else "residual"

    def on_array(batch_fn):
        def fn(src: np.ndarray, protocol: str) -> np.ndarray:
            return apply_to_array(
                src, batch_fn, spatial_dims=2, hu_window=model.hu_window, divisible_by=model.divisible_by,
                device=dev,
            )  # fmt: skip

        return fn

    def sample(**options):
        def batch_fn(x: torch.Tensor) -> torch.Tensor:
            return model.restore(x, generator=gen, **options)

        gen = torch.Generator()

        def fn(src: np.ndarray, protocol: str) -> np.ndarray:
            gen.manual_seed(seed)  # every case starts from the same seed
            return on_array(batch_fn)(src, protocol)

        return fn

    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.autoencoder.reconstruct(x)

    methods = {
        "identity": lambda src, protocol: src,
        "passthrough": on_array(reconstruct),
        "diffusion_ct": sample(),
        f"diffusion_ct_{other}": sample(decode=other),
    }
    if b.stage2.regression:  # the regression's posterior mean (no DDPM): a reference row
        methods["diffusion_ct_mean"] = sample(mean_only=True)
    return methods


def _as_methods(fns: dict[str, Any]) -> list[Any]:
    """``{name: fn(source HU, protocol)}`` as :class:`medfusion.eval.report.Method` objects."""
    from medfusion.eval.report import Method

    return [Method(n, lambda case, sample, fn=fn: fn(case.source, case.protocol)) for n, fn in fns.items()]


def export_default_output(model: Any, folder: Path, *, mean_only: bool) -> None:
    """Re-export ``model`` with the output chosen on validation as its default (``SamplingConfig.mean_only``), so
    that ``medfusion standardize`` and the Python API give by default what the demo shows (``--sample`` or
    ``mean_only=False`` still draw the sample)."""
    from dataclasses import replace

    from medfusion.models.export import export_model

    model.sampling = replace(model.sampling, mean_only=mean_only)
    model.hparams["sampling"] = asdict(model.sampling)
    export_model(model.cpu(), folder, overwrite=True)


def choose_output(methods: dict[str, Any], manifest: Path) -> dict[str, Any]:
    """Which output the demo shows, chosen on the validation patients: the DDPM sample (``diffusion_ct``) or the
    regression's posterior mean (``diffusion_ct_mean``), whichever has the higher mean PSNR over the body."""
    from medfusion.data.manifest import load_manifest
    from medfusion.data.phantoms import LABEL_IDS
    from medfusion.eval import ct_protocol as P

    candidates = [n for n in ("diffusion_ct", "diffusion_ct_mean") if n in methods]
    cases = [P.read_case(e) for e in load_manifest(manifest).split("validation")]
    if len(candidates) == 1 or not cases:
        why = "the only output of this model" if cases else "no validation patients to choose with"
        return {"method": candidates[0], "why": why, "validation_psnr_body": {}}
    protocol = P.CTProtocol.for_label_ids(LABEL_IDS)
    scores = {n: float(np.mean([protocol.image_metrics(methods[n](c.source, c.protocol), c.reference, c.label)
                                ["psnr_body"] for c in cases])) for n in ["identity", *candidates]}  # fmt: skip
    best = max(candidates, key=lambda n: scores[n])
    label = {"diffusion_ct": "the DDPM sample", "diffusion_ct_mean": "the regression's posterior mean"}
    others = "; ".join(f"{label[n]} {scores[n]:.2f} dB" for n in candidates if n != best)
    why = (f"{label[best]}: on the {len(cases)} validation cases it scored {scores[best]:.2f} dB PSNR over the body "
           f"({others}; the raw input {scores['identity']:.2f} dB)")  # fmt: skip
    return {"method": best, "why": why, "validation_psnr_body": scores}


def evaluate(model: Any, manifest: Path, b: DemoBudget, dev, seed: int, output: Path, overwrite: bool) -> dict:
    """Choose the shown output on validation, standardize the test split with it (``standardized/``), and score
    every method with :func:`medfusion.eval.report.evaluate` (``evaluation/``: intervals, cases, figures)."""
    from medfusion.data.manifest import load_manifest
    from medfusion.data.phantoms import LABEL_IDS
    from medfusion.eval import ct_protocol as P
    from medfusion.eval.report import evaluate as evaluate_cases
    from medfusion.io.nifti import write_nifti

    entries = [dict(e) for e in load_manifest(manifest).split("test")]
    if not entries:
        raise ValueError(f"{manifest}: no test entries")
    protocol = P.CTProtocol.for_label_ids(LABEL_IDS)
    cases = [P.read_case(e) for e in entries]
    fns = demo_methods(model, b, dev, seed)
    shown = choose_output(fns, manifest)
    outputs: dict[tuple[str, str], np.ndarray] = {}

    def save(case: Any, sample: int, fn=fns[shown["method"]]) -> np.ndarray:
        out = fn(case.source, case.protocol)
        name = f"{case.case_id}_{case.protocol}.nii.gz"
        write_nifti(output / "standardized" / name, out, case.affine, overwrite=overwrite)
        outputs[(case.case_id, case.protocol)] = out
        return out

    methods = [m if m.name != shown["method"] else m._replace(run=save) for m in _as_methods(fns)]
    summary = evaluate_cases(cases, methods, protocol, output / "evaluation", seed=seed,
                             header={"task": "standardize", "split": "test"}, overwrite=True)  # fmt: skip
    per = {p: {m: {k: v["per_protocol"][p]["metrics"][k]["mean"] for k in P.CASE_METRICS}
               | {"texture_ccc": (v["per_protocol"][p]["texture_ccc"] or {}).get("mean", float("nan"))}
               for m, v in summary["methods"].items()} for p in summary["protocols"]}  # fmt: skip
    patients = {c.case_id: c for c in cases}.values()
    passthrough = fns["passthrough"]
    ceiling = P.mean_rows([protocol.image_metrics(passthrough(c.reference, ""), c.reference, c.label) for c in patients])
    first = {p: next(c for c in cases if c.protocol == p) for p in summary["protocols"]}
    figure_rows = [(p, c.source, outputs[(c.case_id, p)], c.reference, c.affine) for p, c in first.items()]
    return {
        "n_test_cases": len(patients),
        "shown": shown,
        "reference": {k: v["mean"] for k, v in summary["reference"].items()},
        "stage1_ceiling": ceiling,
        "protocols": per,
        "intervals": {m: {"psnr_body": v["metrics"]["psnr_body"], "vs_identity": v["vs_identity"]["psnr_body"],
                          "noise_sd": v["metrics"]["noise_sd"], "texture_ccc": v["texture_ccc"]}
                      for m, v in summary["methods"].items()},  # fmt: skip
        "figure_rows": figure_rows,
    }


def _figure(path: Path, rows: list[tuple], shown: str) -> None:
    """Source / shown output / reference / difference per protocol: axial slices, anterior up, the patient's right
    on the image's left (:func:`medfusion.eval.figures.axial_view`). The difference map leaves out (grey) the
    pixels whose reference lies outside the display window (bone, air): their differences are not soft tissue."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medfusion.eval.figures import axial_view
    from medfusion.io.atomic import atomic_path

    lo, hi = DISPLAY_WINDOW
    fig, axes = plt.subplots(len(rows), 4, figsize=(10, 2.6 * len(rows)), squeeze=False)
    diff_cmap = matplotlib.colormaps["coolwarm"].with_extremes(bad="0.5")
    for r, (proto, src, out, ref, affine) in enumerate(rows):
        views = [axial_view(a, affine) for a in (src, out, ref)]
        for c, title in enumerate([f"{proto}: source", f"output: {shown}", "standard (reference)"]):
            axes[r, c].imshow(views[c], cmap="gray", vmin=lo, vmax=hi)
            axes[r, c].set_title(title, fontsize=8)
        diff = np.ma.masked_where((views[2] < lo) | (views[2] > hi), views[1] - views[2])
        axes[r, 3].imshow(diff, cmap=diff_cmap, vmin=-200, vmax=200)
        axes[r, 3].set_title("output - reference, ±200 HU\n(grey: reference outside the window)", fontsize=7)
        for a in axes[r]:
            a.axis("off")
    fig.suptitle(f"window [{lo:g}, {hi:g}] HU; anterior up, patient's right on the left", fontsize=9)
    fig.tight_layout()
    with atomic_path(path, overwrite=True) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


# ------------------------------------------------------------------------------------------- main job
def run_demo(
    output: str | Path, *, quick: bool = False, device: str = "auto", seed: int = 0, overwrite: bool = False,
    log=print, budget: DemoBudget | str | Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Run the whole demo into ``output``; returns the metrics dict also written to ``metrics.json``.

    ``budget``: a :class:`DemoBudget` or the path of its YAML file (default :func:`default_budget`).
    """
    import lightning as L

    from medfusion.apps.volume_job import resolve_device
    from medfusion.data.builtin import make_dataset
    from medfusion.data.ctsim import STANDARD
    from medfusion.io.atomic import write_text_atomic

    output = Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(f"{output} exists and is not empty; refusing to overwrite it (use --overwrite)")
    dev = resolve_device(device)
    source = budget if isinstance(budget, (str, Path)) else default_budget(quick, dev.type == "cuda")
    b = budget if isinstance(budget, DemoBudget) else load_budget(source)
    timings: dict[str, float] = {}
    L.seed_everything(seed, workers=True, verbose=False)

    t0 = time.perf_counter()
    manifests = make_dataset(
        output / "data", n_patients=b.data.patients, dim=2, size=b.data.size, seed=seed, progress=not quick
    )
    manifest = Path(manifests["standardize"])
    timings["data_s"] = time.perf_counter() - t0
    log(f"[1/4] built-in data: {b.data.patients} patients, {b.data.size}x{b.data.size}, {timings['data_s']:.0f} s")

    t0 = time.perf_counter()
    ae, ae_steps = train_stage1(manifest, b, dev, output, seed, quick)
    timings["stage1_s"] = time.perf_counter() - t0
    log(f"[2/4] stage 1 (autoencoder): {ae_steps} of {b.stage1.steps} steps, bs {2 * b.stage1.batch}, "
        f"{timings['stage1_s']:.0f} s, latent scale {float(ae.latent_scale):.3f}")  # fmt: skip
    short = _guard_note("stage 1", ae_steps, b.stage1.steps, b.stage1.minutes, log)

    t0 = time.perf_counter()
    model, dm_steps = train_stage2(manifest, b, dev, output, seed, quick)
    timings["stage2_s"] = time.perf_counter() - t0
    log(f"[3/4] stage 2 (conditional latent DDPM, v-pred, residual): {dm_steps} of {b.stage2.steps} steps, "
        f"bs {b.stage2.batch}, {timings['stage2_s']:.0f} s -> {output / 'models' / 'diffusion_ct'}")  # fmt: skip
    short += _guard_note("stage 2", dm_steps, b.stage2.steps, b.stage2.minutes, log)

    t0 = time.perf_counter()
    scores = evaluate(model.to(dev).eval(), manifest, b, dev, seed, output, overwrite)
    timings["standardize_s"] = time.perf_counter() - t0
    if scores["shown"]["method"] == "diffusion_ct_mean":
        export_default_output(model, output / "models" / "diffusion_ct", mean_only=True)
    _figure(output / "figure.png", scores.pop("figure_rows"), scores["shown"]["method"])
    metrics = {
        "description": "held-out test patients of the built-in dataset vs the standard-protocol scan",
        "standard_protocol": STANDARD,
        "n_test_cases": scores.pop("n_test_cases"),
        "device": str(dev),
        "quick": quick,
        "budget": {**asdict(b), "file": None if isinstance(budget, DemoBudget) else str(source),
                   "workers_used": loader_workers(b), "ae_steps_done": ae_steps, "dm_steps_done": dm_steps,
                   "short": bool(short), "guard_fired": short},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        **scores,
    }  # fmt: skip
    text = json.dumps(metrics, indent=2, default=_json_default)
    write_text_atomic(output / "metrics.json", text, overwrite=True)
    _print_table(metrics, log)
    log(f"[4/4] outputs: {output / 'standardized'} ({scores['shown']['method']}), {output / 'figure.png'}, "
        f"{output / 'metrics.json'}, {output / 'evaluation' / 'report.md'}")  # fmt: skip
    if short:
        log(f"SHORT RUN: the minute guard stopped {' and '.join(short)} before the step budget; this machine is "
            "slower than the budget assumes, and these numbers are not the demo's")  # fmt: skip
    return metrics


def _guard_note(stage: str, done: int, steps: int, minutes: float, log) -> list[str]:
    """``[stage]`` and a printed warning when the minute guard (a safety stop) ended training before ``steps``."""
    if done >= steps:
        return []
    log(f"WARNING: safety stop fired: {stage} stopped by its {minutes:g}-minute guard at {done} of {steps} steps; "
        "the run is marked short in metrics.json")  # fmt: skip
    return [stage]


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


def _ci(e: dict[str, Any], digits: int) -> str:
    lo, hi = e["ci"]
    if e["mean"] is None or not math.isfinite(e["mean"]):
        return "n/a"
    ci = f" [{lo:.{digits}f}, {hi:.{digits}f}]" if lo is not None and math.isfinite(lo) and math.isfinite(hi) else ""
    return f"{e['mean']:.{digits}f}{ci}"


def _print_table(metrics: dict[str, Any], log) -> None:
    """Per method, all test protocols pooled: means with 95% patient-bootstrap intervals; then PSNR per protocol."""
    from rich.console import Console
    from rich.table import Table

    ref = metrics["reference"]
    console = Console(width=max(Console().width, 110))  # never truncate method names on 80-column pipes
    table = Table(
        title=f"DiffusionCT demo: {metrics['n_test_cases']} held-out patients vs the standard scan, all protocols; "
        f"[95% patient-bootstrap interval] (standard scan: noise SD {ref['noise_sd']:.1f} HU)"
    )
    for col in ("method", "PSNR body dB", "vs raw input dB", "noise SD HU", "texture CCC"):
        table.add_column(col)
    for m, v in metrics["intervals"].items():
        table.add_row(m, _ci(v["psnr_body"], 2), _ci(v["vs_identity"], 2), _ci(v["noise_sd"], 1),
                      _ci(v["texture_ccc"], 3))  # fmt: skip
    console.print(table)
    per = Table(title="PSNR over the body (dB) per protocol (means; intervals in evaluation/report.md)")
    methods = list(metrics["intervals"])
    for col in ("protocol", *methods):
        per.add_column(col)
    for proto, res in metrics["protocols"].items():
        per.add_row(proto, *(f"{res[m]['psnr_body']:.2f}" for m in methods))
    console.print(per)
    log(f"shown output ({metrics['shown']['method']}), chosen on validation: {metrics['shown']['why']}")
    if metrics["shown"]["method"] == "diffusion_ct_mean":
        log("  it is the exported model's default output: medfusion standardize gives the posterior mean, --sample "
            "draws the DDPM sample")  # fmt: skip
    c = metrics["stage1_ceiling"]
    log(f"stage-1 ceiling decode(encode(standard)) vs standard: PSNR body {c['psnr_body']:.2f} dB, "
        f"SSIM {c['ssim']:.4f}, noise SD {c['noise_sd']:.1f} HU")  # fmt: skip
    bud = metrics["budget"]
    log(
        f"budget: stage 1 {bud['ae_steps_done']} steps (bs {2 * bud['stage1']['batch']}), stage 2 "
        f"{bud['dm_steps_done']} steps (bs {bud['stage2']['batch']}), device {metrics['device']}, times {metrics['timings_s']}"
    )


def _quiet_third_party() -> None:
    """Silence the notices a CPU user cannot act on, so the demo's own progress and table stay readable."""
    import logging
    import warnings

    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    for message in (
        ".*nvImageCodec",
        ".*LeafSpec.*",
        ".*module\\(s\\) in eval mode.*",
        ".*does not have many workers.*",
    ):
        warnings.filterwarnings("ignore", message=message)
    warnings.filterwarnings("ignore", category=FutureWarning)


def run(args: argparse.Namespace) -> int:
    import sys

    _quiet_third_party()
    try:
        run_demo(
            args.output, quick=args.quick, device=args.device, seed=args.seed, overwrite=args.overwrite,
            budget=args.budget,
        )  # fmt: skip
    except (FileExistsError, ValueError) as err:
        print(f"medfusion demo: error: {err}", file=sys.stderr)
        return 2
    return 0
