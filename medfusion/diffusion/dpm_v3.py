"""DPM-Solver-v3: a multistep diffusion-ODE solver whose parameterisation is fitted to the model by empirical model
statistics (EMS) (Zheng, Lu, Chen, Zhu, "DPM-Solver-v3: Improved Diffusion ODE Solver with Empirical Model
Statistics", NeurIPS 2023, arXiv 2310.13268).

Notation (VP, λ = log(α/σ) increases towards clean data). In λ the probability-flow ODE is
``d(x/α)/dλ = -σ ε_θ / α``. The paper (§3.1) splits the network term with three statistics per λ:

* ``l_λ`` — the linear part: ``N_θ = σ ε_θ - l x`` with ``l* = argmin E‖∇_x N_θ‖²_F``, the mean diagonal of
  ``σ ∇_x ε_θ`` (per dimension, or per channel here by default);
* ``f_θ = N_θ / α`` and ``s_λ, b_λ = argmin E‖f_θ^(1) - s f_θ - b‖²`` with ``f^(1) = df/dλ`` along the ODE:
  the part of the change of ``f`` that a linear model in ``f`` predicts;
* ``g_θ(λ) = e^{-∫_{λs}^λ s} f_θ - ∫_{λs}^λ e^{-∫_{λs}^r s} b_r dr``, which changes as little as the statistics
  allow.

The exact solution from λ_s to λ_t is then (``L = ∫ l``, ``S = ∫ s``)::

    x_t = (α_t/α_s) e^{-(L_t - L_s)} x_s - α_t ∫_{λs}^{λt} e^{L_r - L_t + S_r - S_s} g_θ(r) dr
          - α_t ∫_{λs}^{λt} e^{L_r - L_t} ∫_{λs}^r e^{S_r - S_u} b_u du dr

and the solver replaces ``g_θ`` by its Taylor polynomial at λ_s whose derivatives come from earlier (multistep)
evaluations (§3.2): order ``k`` uses ``k`` model outputs. The pseudo-order corrector (§3.3, after UniPC) redoes
the last step with the new evaluation as one more node, without an extra network call. With ``l = 1, s = b = 0``
the solver is DPM-Solver++ (data prediction; the paper's App. A.2, the official code's ``degenerated=True``).

Our differences from the official code (github.com/thu-ml/DPM-Solver-v3):

* the network takes integer timesteps, so the statistics live on a grid of integer timesteps and ``f^(1)`` is
  estimated from the neighbouring timesteps t ± 1 (the official code evaluates the network at continuous times);
* the statistics are linearly interpolated in λ and every integral is a trapezoid rule on the union of the grid and
  the step end points, refined to ``quad_step`` in λ (the official code snaps steps to its uniform λ grid);
* ``reduce="channel"`` (default) pools the statistics over the spatial dimensions, so one set serves every image
  size and 2D as well as 3D; ``reduce="none"`` keeps the paper's per-dimension statistics (one image size);
* the sampler follows the core contract (:mod:`medfusion.diffusion.samplers`): the last evaluated timestep jumps to
  clean data with that evaluation's data prediction, like every other sampler here (the official code stops at
  t = 1/T).

``l`` is estimated with Rademacher probes ``v ⊙ (J v)`` (Hutchinson's diagonal estimator; ``J v`` by a central
difference of ε̂), ``s`` and ``b`` by least squares over the data (a relative ridge of 1e-8 keeps ``s`` finite
where ``f`` has numerically no spread: ``s → 0`` and ``b`` takes the mean drift). The data are ``x_t = α_t x0 +
σ_t ε`` from training images (App. C.1.1 estimates the expectations the same way).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from medfusion.diffusion.denoiser import Callback, Denoised, DiffusionModel, make_denoiser, prepare_steps
from medfusion.diffusion.gaussian import Prediction
from medfusion.diffusion.schedules import NoiseSchedule

Reduce = Literal["channel", "none"]
REDUCES: tuple[str, ...] = ("channel", "none")
FORMAT = "medfusion-dpm_v3-ems-1"
_KEYS = ("timesteps", "lambdas", "l", "s", "b")

__all__ = ["EMS", "compute_ems", "degenerate_ems", "load_ems", "sample_dpm_v3", "save_ems"]


class EMS(NamedTuple):
    """Empirical model statistics on a grid of G integer timesteps (descending, i.e. λ ascending).

    ``l``, ``s``, ``b``: float64 ``(G, C)`` (``reduce="channel"``, broadcast over space) or ``(G, C, *spatial)``.
    ``lambdas``: λ_t = log(α_t/σ_t) of the grid in the schedule the statistics were computed with.
    """

    timesteps: Tensor
    lambdas: Tensor
    l: Tensor  # noqa: E741 - the paper's name
    s: Tensor
    b: Tensor


def _lambdas(schedule: NoiseSchedule, ts: Tensor) -> Tensor:
    return 0.5 * schedule.log_snr(ts.cpu().long()).double()


def degenerate_ems(schedule: NoiseSchedule, channels: int = 1) -> EMS:
    """``l = 1, s = b = 0`` on every timestep: DPM-Solver-v3 is then DPM-Solver++ (paper App. A.2)."""
    ts = torch.arange(schedule.num_train_timesteps - 1, -1, -1)
    one = torch.ones(len(ts), channels, dtype=torch.float64)
    return EMS(ts, _lambdas(schedule, ts), one, torch.zeros_like(one), torch.zeros_like(one))


# ------------------------------------------------------------------------------------------- estimating the EMS
def _batches(data: Tensor | Iterable[Any], cond: Any) -> Iterable[tuple[Tensor, Any]]:
    if isinstance(data, Tensor):
        yield data, cond
        return
    for item in data:
        if isinstance(item, (tuple, list)):
            yield item[0], item[1]
        else:
            yield item, cond


def _reduce_sum(v: Tensor, reduce: str) -> Tensor:
    """Sum over the batch (and, for ``channel``, the spatial dimensions): ``(C,)`` or ``(C, *spatial)``."""
    v = v.double()
    return v.sum(dim=[0, *range(2, v.ndim)]) if reduce == "channel" else v.sum(0)


def _per_item(v: Tensor, reduce: str) -> int:
    return v.shape[0] * (math.prod(v.shape[2:]) if reduce == "channel" else 1)


def _bcast(stat: Tensor, x: Tensor) -> Tensor:
    """A ``(C,)`` or ``(C, *spatial)`` statistic shaped to broadcast against ``x`` (B, C, *spatial)."""
    stat = stat.to(device=x.device, dtype=x.dtype)
    return stat.reshape(*stat.shape, *([1] * (x.ndim - 1 - stat.ndim)))


def _interp(lam: Tensor, grid: Tensor, values: Tensor) -> Tensor:
    """Values (G, *S) on the ascending ``grid`` linearly interpolated at ``lam`` (M,) -> (M, *S), clamped."""
    lam = lam.clamp(grid[0], grid[-1])
    j = torch.searchsorted(grid, lam).clamp(1, len(grid) - 1)
    lo, hi = grid[j - 1], grid[j]
    w = ((lam - lo) / (hi - lo).clamp_min(1e-300)).reshape(-1, *([1] * (values.ndim - 1)))
    return values[j - 1] * (1 - w) + values[j] * w


def _f(d: Denoised, x: Tensor, a: float, l_t: Tensor) -> Tensor:
    """``f_θ = (σ ε̂ - l x)/α = ((1 - l) x - α x̂0)/α`` (paper §3.1)."""
    return ((1 - l_t) * x - a * d.x0) / a


def compute_ems(
    model: DiffusionModel,
    data: Tensor | Iterable[Any],
    schedule: NoiseSchedule,
    grid: Tensor | Sequence[int],
    *,
    prediction: Prediction = "epsilon",
    cond: Any = None,
    reduce: Reduce = "channel",
    num_probes: int = 1,
    fd_step: float = 1e-3,
    generator: torch.Generator | None = None,
) -> EMS:
    """Estimate the EMS ``l, s, b`` of ``model`` on the integer timesteps ``grid`` (paper §3.1, App. C.1.1).

    Args:
        model: ``model(x_t, t, cond) -> ε, v or x0`` (``prediction``), as for the samplers; call this under
            ``torch.no_grad()`` (no gradients are needed) and in float32 or better (the Jacobian is a finite
            difference of its output).
        data: clean training samples: one tensor ``(N, C, *spatial)`` or an iterable of batches, each a tensor or
            an ``(x0, cond)`` pair. It is iterated twice (``l`` first, then ``s, b``), so a list, tensor or
            DataLoader, not a one-shot generator.
        grid: integer timesteps in [0, T-1] (e.g. ``timesteps(100, "logsnr", schedule=...)``), at least two.
        cond: conditioning for batches given without one.
        reduce: ``channel`` pools over space (any image size later), ``none`` keeps per-dimension statistics.
        num_probes: Rademacher probes per sample and timestep for the Jacobian diagonal.
        fd_step: central-difference step (in x units) of the Jacobian-vector products.
        generator: CPU generator for the forward noise and the probes (reproducible statistics).

    Returns:
        :class:`EMS` on ``grid`` sorted descending (float64, on the CPU).
    """
    if reduce not in REDUCES:
        raise ValueError(f"unknown reduce {reduce!r}; valid: {', '.join(REDUCES)}")
    if num_probes < 1 or fd_step <= 0:
        raise ValueError(f"num_probes must be >= 1 and fd_step > 0, got {num_probes}, {fd_step}")
    if not isinstance(data, Tensor) and iter(data) is data:  # type: ignore[arg-type]
        raise ValueError("data must be re-iterable (a tensor, list or DataLoader): it is read twice")
    T = schedule.num_train_timesteps
    ts = sorted({int(t) for t in (grid.tolist() if isinstance(grid, Tensor) else grid)}, reverse=True)
    if len(ts) < 2 or ts[-1] < 0 or ts[0] > T - 1:
        raise ValueError(f"grid needs at least two distinct timesteps in [0, {T - 1}], got {ts}")
    run = _Estimation(model, data, cond, schedule, prediction, reduce, generator)
    l_grid = run.linear_part(ts, num_probes, fd_step)
    s, b = run.drift(ts, l_grid)
    return EMS(torch.tensor(ts), torch.tensor([run.lam[t] for t in ts], dtype=torch.float64), l_grid, s, b)


class _Estimation:
    """The two passes of :func:`compute_ems` over the data (shared noise stream, schedule tables, reduction)."""

    def __init__(
        self,
        model: DiffusionModel,
        data: Tensor | Iterable[Any],
        cond: Any,
        schedule: NoiseSchedule,
        prediction: Prediction,
        reduce: str,
        generator: torch.Generator | None,
    ) -> None:
        self.model, self.data, self.cond, self.schedule, self.prediction = (
            model,
            data,
            cond,
            schedule,
            prediction,
        )
        self.reduce = reduce
        self.abar = schedule.alphas_cumprod.cpu().double().tolist()
        self.lam = [0.5 * (math.log(a) - math.log1p(-a)) for a in self.abar]
        self.gen = generator if generator is not None else torch.Generator().manual_seed(0)
        self.count = 0

    def batches(self) -> Iterable[tuple[Tensor, Callable[[Tensor, int], Denoised]]]:
        for x0, c in _batches(self.data, self.cond):
            yield x0, make_denoiser(self.model, self.schedule, self.prediction, c)

    def noised(self, x0: Tensor, t: int) -> Tensor:
        """``x_t = α_t x0 + σ_t ε`` with fresh noise from the generator."""
        eps = torch.randn(x0.shape, generator=self.gen, dtype=torch.float64).to(x0.device, x0.dtype)
        return math.sqrt(self.abar[t]) * x0 + math.sqrt(1 - self.abar[t]) * eps

    def linear_part(self, ts: list[int], num_probes: int, fd_step: float) -> Tensor:
        """1. ``l_λ = E[diag(σ ∇_x ε_θ)]`` (the minimiser of E‖∇_x N_θ‖²_F); diag(J) ≈ v ⊙ (J v), v Rademacher,
        J v by a central difference of ε̂."""
        acc: dict[int, Tensor] = {}
        for x0, denoise in self.batches():
            self.count += _per_item(x0, self.reduce)
            for t in ts:
                x = self.noised(x0, t)
                for _ in range(num_probes):
                    v = (torch.randint(0, 2, x.shape, generator=self.gen) * 2 - 1).to(x.device, x.dtype)
                    jv = (denoise(x + fd_step * v, t).eps - denoise(x - fd_step * v, t).eps) / (2 * fd_step)
                    part = _reduce_sum(math.sqrt(1 - self.abar[t]) * v * jv, self.reduce) / num_probes
                    acc[t] = acc.get(t, 0) + part.cpu()
        if self.count == 0:
            raise ValueError("data yielded no samples")
        return torch.stack([acc[t] / self.count for t in ts])

    def drift(self, ts: list[int], l_grid: Tensor) -> tuple[Tensor, Tensor]:
        """2. ``f = N_θ/α`` and ``f^(1) = df/dλ`` along the ODE (x moved to t ± 1 by the DDIM step, central
        difference in λ); 3. the least-squares ``f^(1) ≈ s f + b`` per dimension (or channel)."""
        T, ab, lam = len(self.abar), self.abar, self.lam
        grid_lam = torch.tensor([lam[t] for t in ts], dtype=torch.float64)
        sums = [torch.zeros_like(l_grid) for _ in range(4)]  # Σf, Σf', Σf², Σf f'
        for x0, denoise in self.batches():
            for g, t in enumerate(ts):
                x = self.noised(x0, t)
                d = denoise(x, t)
                f0 = _f(d, x, math.sqrt(ab[t]), _bcast(l_grid[g], x))
                near = []
                for tn in (max(t - 1, 0), min(t + 1, T - 1)):
                    if tn == t:  # one-sided at the ends of the table
                        near.append(f0)
                        continue
                    xn = math.sqrt(ab[tn]) * d.x0 + math.sqrt(1 - ab[tn]) * d.eps
                    l_n = _interp(torch.tensor([lam[tn]], dtype=torch.float64), grid_lam, l_grid)[0]
                    near.append(_f(denoise(xn, tn), xn, math.sqrt(ab[tn]), _bcast(l_n, xn)))
                f0, f1 = (
                    f0.double(),
                    (near[0].double() - near[1].double()) / (lam[max(t - 1, 0)] - lam[min(t + 1, T - 1)]),
                )
                for acc, v in zip(sums, (f0, f1, f0 * f0, f0 * f1)):
                    acc[g] += _reduce_sum(v, self.reduce).cpu()
        m_f, m_f1, m_ff, m_ff1 = (acc / self.count for acc in sums)
        var, cov = (m_ff - m_f**2).clamp_min(0), m_ff1 - m_f * m_f1
        s = cov / (var + 1e-8 * m_ff + 1e-300)  # relative ridge: s -> 0 where f has numerically no spread
        return s, m_f1 - s * m_f


# ------------------------------------------------------------------------------------------------ file format
def save_ems(stats: EMS, path: str | Path, overwrite: bool = False) -> Path:
    """Write ``stats`` to a safetensors file (atomic; never overwrites unless asked)."""
    from safetensors.torch import save_file

    from medfusion.io.atomic import atomic_path

    tensors = {k: getattr(stats, k).detach().cpu().contiguous() for k in _KEYS}
    with atomic_path(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
    return Path(path)


def load_ems(path: str | Path) -> EMS:
    """Read statistics written by :func:`save_ems`; ``ValueError`` naming the file if it is not such a file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DPM-Solver-v3 statistics not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta, names = fh.metadata() or {}, set(fh.keys())
            if meta.get("format") != FORMAT or not set(_KEYS) <= names:
                raise ValueError(f"format {meta.get('format')!r} with tensors {sorted(names)}")
            stats = EMS(*(fh.get_tensor(k) for k in _KEYS))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for corrupt files
        raise ValueError(f"{path}: not a DPM-Solver-v3 statistics file ({FORMAT}): {err}") from err
    g = len(stats.timesteps)
    if g < 2 or stats.lambdas.shape != (g,) or any(getattr(stats, k).shape[0] != g for k in "lsb"):
        raise ValueError(f"{path}: inconsistent statistics shapes {[tuple(t.shape) for t in stats]}")
    if not all(torch.isfinite(getattr(stats, k)).all() for k in ("lambdas", "l", "s", "b")):
        raise ValueError(f"{path}: statistics contain NaN or inf")
    return stats


# ------------------------------------------------------------------------------------------------ the solver
class _Tables:
    """The λ-integrals of one sampling run: the statistics interpolated (linearly in λ) on one fine grid that holds
    every step's λ and the statistics' knots, spacing <= ``quad_step``; trapezoid rule on slices of it."""

    def __init__(self, stats: EMS, lams: Sequence[float], quad_step: float) -> None:
        order = torch.argsort(stats.lambdas)
        grid = stats.lambdas[order].double()
        lo, hi = min(lams), max(lams)
        knots = torch.tensor(sorted({*lams, *(v for v in grid.tolist() if lo < v < hi)}), dtype=torch.float64)
        if len(knots) == 1:
            knots = knots.repeat(2)
        a, c = knots[:-1], knots[1:]
        counts = ((c - a) / quad_step).ceil().long().clamp_min(1)
        seg = torch.repeat_interleave(torch.arange(len(a)), counts)
        local = torch.arange(len(seg)) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        self.r = torch.cat([a[seg] + (c - a)[seg] * local / counts[seg], knots[-1:]])
        starts = torch.cat([counts.cumsum(0) - counts, counts.sum().reshape(1)]).tolist()
        self.pos = {float(k): p for k, p in zip(knots.tolist(), starts)}
        self.l, self.s, self.b = (_interp(self.r, grid, getattr(stats, k)[order].double()) for k in "lsb")
        self.L, self.S = _cumtrapz(self.l, self.r), _cumtrapz(self.s, self.r)

    def at(self, lam: float) -> Tensor:
        """``l`` at a step's λ, shape ``(C,)`` or ``(C, *spatial)``."""
        return self.l[self.pos[lam]]

    def step(self, lo: float, hi: float, k_max: int) -> tuple[Tensor, list[Tensor], Tensor]:
        """For the step λ_s = lo -> λ_t = hi: ``e^{-(L_t - L_s)}``, the Taylor weights
        ``K_k = ∫ e^{L_r - L_t + S_r - S_s} (r - λ_s)^k / k! dr`` (k < k_max) and the b term
        ``∫ e^{L_r - L_t} ∫_{λs}^r e^{S_r - S_u} b_u du dr``."""
        i, j = self.pos[lo], self.pos[hi] + 1
        r, L, S, bv = self.r[i:j], self.L[i:j] - self.L[i], self.S[i:j] - self.S[i], self.b[i:j]
        wl = torch.exp(L - L[-1])
        w = wl * torch.exp(S)
        dr = _col(r - lo, w)
        ks = [_trapz(w * dr**k / math.factorial(k), r) for k in range(k_max)]
        inner = torch.exp(S) * _cumtrapz(torch.exp(-S) * bv, r)
        return torch.exp(-L[-1]), ks, _trapz(wl * inner, r)

    def transport(self, lam_j: float, lam_s: float) -> tuple[Tensor, Tensor]:
        """``g_j = E f_j + B`` (g of the step anchored at λ_s): ``E = e^{S_s - S_j}``,
        ``B = ∫_{λj}^{λs} e^{S_s - S_u} b_u du`` (oriented integral)."""
        if lam_j == lam_s:
            return torch.ones_like(self.l[0]), torch.zeros_like(self.l[0])
        i, j = sorted((self.pos[lam_j], self.pos[lam_s]))
        r, S, bv = self.r[i : j + 1], self.S[i : j + 1] - self.S[i], self.b[i : j + 1]
        if lam_j < lam_s:
            return torch.exp(S[-1]), _trapz(torch.exp(S[-1] - S) * bv, r)
        return torch.exp(-S[-1]), -_trapz(torch.exp(-S) * bv, r)


def _col(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def _trapz(y: Tensor, r: Tensor) -> Tensor:
    return (0.5 * _col(r[1:] - r[:-1], y) * (y[1:] + y[:-1])).sum(0)


def _cumtrapz(y: Tensor, r: Tensor) -> Tensor:
    inc = 0.5 * _col(r[1:] - r[:-1], y) * (y[1:] + y[:-1])
    return torch.cat([torch.zeros_like(y[:1]), inc.cumsum(0)])


def _taylor(lams: Sequence[float], gs: Sequence[Tensor], pseudo: bool) -> list[Tensor]:
    """``g^(1) … g^(n)`` at ``lams[0]`` from n+1 nodes (paper §3.2): the derivatives of the interpolating
    polynomial, or (``pseudo``, §3.3) ``k!`` times the k-th Newton divided difference."""
    n = len(gs) - 1
    if n == 0:
        return []
    if pseudo:
        table = [list(gs)]
        for k in range(1, n + 1):
            prev = table[-1]
            table.append([(prev[j] - prev[j + 1]) / (lams[j] - lams[j + k]) for j in range(n - k + 1)])
        return [table[k][0] * math.factorial(k) for k in range(1, n + 1)]
    # Σ_k c_k (λ_j - λ_0)^k = g_j - g_0 (j = 1..n); g^(k) = k! c_k
    vander = torch.tensor(
        [[(lams[j] - lams[0]) ** k for k in range(1, n + 1)] for j in range(1, n + 1)], dtype=torch.float64
    )
    inv = torch.linalg.inv(vander).tolist()
    return [math.factorial(k + 1) * sum(inv[k][j] * (gs[j + 1] - gs[0]) for j in range(n)) for k in range(n)]


def _update(
    tab: _Tables, x_s: Tensor, nodes: list[tuple[float, Tensor]], lam_t: float, pseudo: bool
) -> Tensor:
    """One step from ``nodes[0] = (λ_s, f_s)`` to λ_t with ``len(nodes)`` nodes (order = len(nodes))."""
    lam_s = nodes[0][0]
    a_s, a_t = 1 / math.sqrt(1 + math.exp(-2 * lam_s)), 1 / math.sqrt(1 + math.exp(-2 * lam_t))
    decay, ks, kb = tab.step(lam_s, lam_t, len(nodes))
    # 1. g_j = e^{S_s - S_j} f_j + ∫_{λj}^{λs} e^{S_s - S_u} b_u du: every node in the step's g
    gs = []
    for lam_j, f_j in nodes:
        e, bj = tab.transport(lam_j, lam_s)
        gs.append(_bcast(e, x_s) * f_j + _bcast(bj, x_s))
    # 2. x_t = (α_t/α_s) e^{-(L_t-L_s)} x_s - α_t [K_0 g_s + Σ_k K_k g^(k) + b term]
    x_t = (a_t / a_s) * _bcast(decay, x_s) * x_s - a_t * (_bcast(ks[0], x_s) * gs[0] + _bcast(kb, x_s))
    # 3. Taylor terms from the multistep derivative estimates
    for k, g_k in enumerate(_taylor([lam for lam, _ in nodes], gs, pseudo), start=1):
        x_t = x_t - a_t * _bcast(ks[k], x_s) * g_k
    return x_t


def _check_stats(stats: EMS, schedule: NoiseSchedule, lams: Sequence[float], x: Tensor) -> None:
    ref = _lambdas(schedule, stats.timesteps)
    if not torch.allclose(ref, stats.lambdas.double(), rtol=1e-6, atol=1e-6):
        raise ValueError("the DPM-Solver-v3 statistics were computed for another noise schedule")
    lo, hi = float(stats.lambdas.min()), float(stats.lambdas.max())
    if min(lams) < lo - 1e-9 or max(lams) > hi + 1e-9:
        raise ValueError(f"the statistics cover λ in [{lo:.3f}, {hi:.3f}]; the timesteps reach [{min(lams):.3f}, "
                         f"{max(lams):.3f}]: compute them on a grid that spans the sampling timesteps")  # fmt: skip
    shape = tuple(stats.l.shape[1:])
    if shape[0] != x.shape[1] or (len(shape) > 1 and shape != tuple(x.shape[1:])):
        raise ValueError(f"statistics of shape {shape} do not fit samples of shape {tuple(x.shape)}")


def sample_dpm_v3(
    model: DiffusionModel,
    x: Tensor,
    timesteps: Tensor | Sequence[int],
    *,
    schedule: NoiseSchedule,
    prediction: Prediction = "epsilon",
    cond: Any = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    clip: tuple[float, float] | None = None,
    threshold: float | None = None,
    stats: EMS | None = None,
    order: int = 3,
    corrector: bool = True,
    pseudo: bool = False,
    lower_order_final: bool = True,
    quad_step: float = 1e-3,
) -> Tensor:
    """DPM-Solver-v3 multistep predictor (+ pseudo-order corrector), Zheng et al. 2023 §3.2-3.3; deterministic
    (``generator`` unused), one network evaluation per step.

    Args:
        stats: the model's :class:`EMS` (:func:`compute_ems`, :func:`load_ems`). None uses ``l = 1, s = b = 0``
            (DPM-Solver++) with a warning.
        order: predictor order 1-3 (the paper: 3 unconditional, 2 guided); it ramps 1, 2, ... over the first
            steps, and with ``lower_order_final`` the last steps use at most as many orders as steps remain,
            counting the final first-order jump to clean data (the official code's rule for its last steps).
        corrector: redo each step with the new evaluation as one more node (order + 1, pseudo); no extra NFE.
        pseudo: pseudo-order predictor (divided differences; the paper uses it at 5 steps only).
        quad_step: λ spacing of the trapezoid rule of the integrals.
        Others: the sampler contract (:mod:`medfusion.diffusion.samplers`).
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    if not 0 < quad_step <= 0.1:
        raise ValueError(f"quad_step must be in (0, 0.1], got {quad_step}")
    out_dtype = x.dtype
    x, ts, ab = prepare_steps(x, timesteps, schedule)
    if stats is None:
        warnings.warn(
            "dpm_v3 without statistics runs as DPM-Solver++ (l=1, s=b=0); compute them with "
            "medfusion.diffusion.dpm_v3.compute_ems (exported models: medfusion.models.dpm_v3_stats)", stacklevel=2,
        )  # fmt: skip
        stats = degenerate_ems(schedule, x.shape[1])
    n = len(ts)
    lams = [0.5 * (math.log(a) - math.log1p(-a)) for a in ab[:n]]
    _check_stats(stats, schedule, lams, x)
    tab = _Tables(stats, lams, quad_step)
    denoise = make_denoiser(model, schedule, prediction, cond, clip, threshold)
    hist: list[tuple[float, Tensor]] = []  # (λ_j, f_j) of the last evaluations, newest last
    x_s, k_prev = x, 0
    for i, t in enumerate(ts):
        d = denoise(x, t)
        a_i, l_i = math.sqrt(ab[i]), _bcast(tab.at(lams[i]), x)
        f_i = _f(d, x, a_i, l_i)
        if corrector and i > 0:
            # 1. corrector (§3.3): the step from λ_s again, nodes s, t, earlier ones; f_t (N_θ) is kept
            nodes = [hist[-1], (lams[i], f_i), *reversed(hist[-(k_prev + 1) : -1])][: k_prev + 1]
            x = _update(tab, x_s, nodes, lams[i], pseudo=True)
        if callback is not None:
            callback(i, t, x, d.x0)
        hist = (hist + [(lams[i], f_i)])[-4:]
        if i == n - 1:
            # 2. to clean data: the data prediction x̂0 = ((1 - l) x - α f)/α of the (corrected) sample
            x = ((1 - l_i) * x - a_i * f_i) / a_i
            break
        # 3. predictor (§3.2): order ramps up; lower_order_final keeps it <= the steps left
        k = min(order, i + 1)
        if lower_order_final:  # counting the final jump to clean data (first order) as the last step
            k = min(k, n - i)
        x_s, k_prev = x, k
        x = _update(tab, x, list(reversed(hist[-k:])), lams[i + 1], pseudo=pseudo)
    return x.to(out_dtype)
