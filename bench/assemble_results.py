"""Assemble bench/RESULTS.md from the per-topic files in bench/results/ (run after updating any of them).

    python bench/assemble_results.py

Each topic file keeps its own commands, machine and training budget beside its figures; this script only
concatenates them under one header, in issue order, demoting their headings by one level.
"""

from __future__ import annotations

import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = [
    "convert", "data_pipelines", "dataset", "samplers", "diffusion_ct_bench", "diffusion_ct_bench_skipdrop", "diffusion_ct_bench_shortcuts", "diffusion_ct_bench_regression", "diffusion_ct", "drdm",
    "segmentation", "registration", "restoration_lowdose", "restoration_kernel", "restoration_sr",
]  # fmt: skip
HEADER = """# medfusion benchmark results

Assembled by `python bench/assemble_results.py` from `bench/results/*.md`; edit those, not this file.
Every figure states its command, machine and training budget. Sessions 1 and 2 (2026-11-26/27) drew **no GPU**:
all figures are from a 2-vCPU AMD EPYC VM (torch 2.13.0+cpu), often loaded by parallel jobs; GPU figures
(`bench/train_step.py`, demo/standardize timings per 512² slice) are still to be measured on the device machine.
Session 2 trained with fixed step budgets (so figures do not depend on load; wall time beside them): thousands of
CPU steps on small crops, i.e. small-scale results, far from the papers' GPU budgets; each section says so.
Session 3 (no GPU either) changed the built-in data to format 2: every protocol of a patient now comes from one raw
acquisition (kernels of the same projections, thick slices from thin rows, lower doses by noise insertion), as real
paired kernel data do. Tables measured on format-1 data (protocols with independent noise) say so at their top.
Session 4 (no GPU) fixed DiffusionCT's stage-1 ceiling (KL weighting, DC-AE shortcuts: 35.7 -> 46.5 dB) and measured
stage 2 as the new limit (diffusion_ct_bench_shortcuts, diffusion_ct "Session 4").
Session 5 (no GPU) moved DiffusionCT's denoiser to the image grid: on 12 test patients it now beats identity on mean
PSNR/SSIM with the standard's noise texture (diffusion_ct_bench_regression, diffusion_ct "Session 5").

"""


def demote(text: str) -> str:
    return re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", text, flags=re.MULTILINE)


def main() -> None:
    files = {p.stem: p for p in sorted((HERE / "results").glob("*.md"))}
    names = [n for n in ORDER if n in files] + sorted(set(files) - set(ORDER))
    parts = [HEADER, "## Contents\n"]
    parts += [f"- [{n}](results/{n}.md)" for n in names]
    parts.append("")
    for n in names:
        parts.append(demote(files[n].read_text().strip()) + "\n")
    (HERE / "RESULTS.md").write_text("\n".join(parts))
    print(f"wrote {HERE / 'RESULTS.md'} from {len(names)} files")


if __name__ == "__main__":
    main()
