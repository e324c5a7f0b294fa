"""``medfusion evaluate --task segment|register``: the few-shot and registration protocols end to end on tiny
phantoms, the training stream that makes 1 and N ranks train the same model, exact case sharding, the deformers
against SimpleITK, and the errors a user gets."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from medfusion.apps.deformers import make_deformer
from medfusion.apps.downstream import StreamSampler, few_shot_subset, score_cases
from medfusion.cli import main
from medfusion.eval.stats import cluster_mean, cluster_statistic, resample_counts

TINY = ["--train-steps", "3", "--train-batch", "4", "--n-boot", "50", "--copies", "1", "--quiet"]


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    from medfusion.data.builtin import make_dataset

    root = tmp_path_factory.mktemp("downstream")
    return make_dataset(
        root / "data",
        n_patients=8,
        dim=2,
        size=32,
        protocols=["standard"],
        seed=3,
        split=(0.5, 0.25, 0.25),
        progress=False,
    )


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _segment(manifests, out, *extra, split="validation"):
    return main(["evaluate", "--task", "segment", "--manifest", str(manifests["segment"]), "--split", split,
                 "--output", str(out), "--channels", "8", "16", *TINY, *extra])  # fmt: skip


def test_segment_protocol_writes_every_case_and_paired_differences(manifests, tmp_path):
    out = tmp_path / "seg"
    rc = _segment(manifests, out, "--augment", "none", "--augment", "elastic", "--fractions", "0.5", "1.0",
                  "--seeds", "0", "--elastic-spacing", "8", split="test")  # fmt: skip
    assert rc == 0
    doc = json.loads(manifests["segment"].read_text())
    n_test, n_train = len(doc["test"]), len(doc["training"])
    rows = _rows(out / "cases.csv")
    assert len(rows) == 2 * 2 * n_test  # fractions x augmentations x cases (one seed)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"]["environment"]["libraries"]["torch"] == torch.__version__  # what produced the numbers
    log = [json.loads(line) for line in (out / "test_log.jsonl").read_text().splitlines()]
    assert log[-1]["environment"] == summary["run"]["environment"]
    assert "Environment: medfusion" in (out / "report.md").read_text()
    assert [(e["fraction"], e["augmentation"]) for e in summary["results"]] == [
        (f, a) for f in (0.5, 1.0) for a in ("none", "elastic")
    ]
    for e in summary["results"]:
        lo, hi = e["dice"]["ci"]
        assert lo <= e["dice"]["mean"] <= hi
        assert e["n_labelled"] == max(1, round(e["fraction"] * n_train))
        assert ("dice_vs_none" in e) == (e["augmentation"] != "none")
        if "dice_vs_none" in e:  # the paired difference of the same rows is the difference of the means
            none = next(
                x
                for x in summary["results"]
                if x["fraction"] == e["fraction"] and x["augmentation"] == "none"
            )
            assert e["dice_vs_none"]["mean"] == pytest.approx(
                e["dice"]["mean"] - none["dice"]["mean"], abs=1e-9
            )
        if e["augmentation"] == "none":  # no field (NaN is written as null)
            assert e["folding_pct"] is None and e["displacement_vox"] is None
        else:  # MONAI's elastic field, recovered through the same draw
            assert 0 <= e["folding_pct"] < 50 and e["displacement_vox"] > 0.1
            assert len(e["dice_vs_none_per_seed"]) == 1
    assert (out / "figures" / "dice_vs_fraction.png").stat().st_size > 0
    assert (out / "figures" / "overlays.png").stat().st_size > 0
    assert f"| 0.5 | {max(1, round(0.5 * n_train))} | elastic |" in (out / "report.md").read_text()
    log = (out / "test_log.jsonl").read_text().splitlines()
    assert len(log) == 1 and json.loads(log[0])["task"] == "segment"


def test_segment_is_reproducible_and_training_changes_the_model(manifests, tmp_path):
    args = ("--augment", "none", "--augment", "drdm-random", "--fractions", "1.0", "--seeds", "0")
    assert _segment(manifests, tmp_path / "a", *args) == 0
    fold = [e["folding_pct"] for e in json.loads((tmp_path / "a" / "summary.json").read_text())["results"]]
    assert fold[0] is None and 0 <= fold[1] < 5  # none has no field; the forward-process fields barely fold
    assert _segment(manifests, tmp_path / "b", *args) == 0
    a, b = (tmp_path / "a" / "cases.csv").read_text(), (tmp_path / "b" / "cases.csv").read_text()
    assert a == b
    rows = _rows(tmp_path / "a" / "cases.csv")
    assert any(r["dice"] != s["dice"] for r, s in zip(rows[: len(rows) // 2], rows[len(rows) // 2 :]))


def test_a_trained_drdm_arm_runs_and_its_weights_are_recorded(manifests, tmp_path):
    """``drdm:DIR`` (an exported DRDM) in both tasks; the summary names the model file by its SHA-256."""
    from medfusion.models.drdm import DRDM
    from medfusion.models.export import export_model, weights_sha256

    model = export_model(DRDM(spatial_dims=2, val_recovery_steps=2), tmp_path / "drdm")
    arm = f"drdm:{model}"
    steps = ["--drdm-steps", "2", "--drdm-t-range", "10", "12", "--seeds", "0"]
    assert _segment(manifests, tmp_path / "s", "--augment", arm, "--fractions", "1.0", *steps) == 0
    rc = main(["evaluate", "--task", "register", "--manifest", str(manifests["register"]), "--split", "validation",
               "--output", str(tmp_path / "r"), "--augment", f"real+{arm}", "--channels", "8", "8", "8", "8",
               *steps, *TINY])  # fmt: skip
    assert rc == 0
    expected = {str(model): {"path": str(model), "weights_sha256": weights_sha256(model)}}
    for out, column in ((tmp_path / "s", "augmentation"), (tmp_path / "r", "arm")):
        assert json.loads((out / "summary.json").read_text())["run"]["models"] == expected
        assert {r[column] for r in _rows(out / "cases.csv")} >= {arm if column == "augmentation" else f"real+{arm}"}


def test_register_protocol_scores_before_and_every_arm(manifests, tmp_path):
    out = tmp_path / "reg"
    rc = main(["evaluate", "--task", "register", "--manifest", str(manifests["register"]), "--split", "validation",
               "--output", str(out), "--augment", "real", "--augment", "bspline", "--augment", "real+drdm-random",
               "--seeds", "0", "--channels", "8", "8", "8", "8", *TINY])  # fmt: skip
    assert rc == 0
    n_val = len(json.loads(manifests["register"].read_text())["validation"])
    rows = _rows(out / "cases.csv")
    assert len(rows) == n_val * (1 + 3)
    summary = json.loads((out / "summary.json").read_text())
    results = {e["arm"]: e for e in summary["results"]}
    assert list(results) == ["before", "real", "bspline", "real+drdm-random"]
    assert (
        results["before"]["folding_pct"]["mean"]["mean"] == 0
        and results["before"]["sdlogj"]["mean"]["mean"] == 0
    )
    assert results["real"]["sdlogj"]["mean"]["mean"] > 0  # trained: the field is no longer the identity
    assert "dice_vs_real" in results["bspline"] and "dice_vs_real" not in results["real"]
    for e in results.values():
        for m in ("dice", "hd95", "sdlogj", "folding_pct"):
            assert set(e[m]) == {"mean", "sd", "worst30"}
    assert "| real+drdm-random |" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--augment", "mixup"], "unknown augmentation 'mixup'; valid: none, elastic"),
        (["--augment", "drdm:/no/such/model"], "DRDM model not found: /no/such/model"),
        (["--fractions", "0"], "labelled fractions must lie in (0, 1]"),
        (["--augment", "elastic", "--copies", "0"], "--copies must be >= 1 with an augmentation"),
    ],
)
def test_bad_options_give_one_line_and_exit_2(manifests, tmp_path, capsys, argv, message):
    rc = _segment(manifests, tmp_path / "out", *argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out" / "summary.json").exists()


def test_wrong_manifest_task_and_existing_outputs_fail_before_training(manifests, tmp_path, capsys):
    rc = main(["evaluate", "--task", "register", "--manifest", str(manifests["segment"]), "--split", "validation",
               "--output", str(tmp_path / "r"), *TINY])  # fmt: skip
    assert rc == 2 and "segment.json" in capsys.readouterr().err
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "summary.json").write_text("{}")
    assert _segment(manifests, tmp_path / "s", "--fractions", "1.0", "--seeds", "0") == 2
    assert "summary.json" in capsys.readouterr().err and (tmp_path / "s" / "summary.json").read_text() == "{}"


# ------------------------------------------------------------------------------------------------ the engine
def test_stream_ranks_share_each_global_batch(monkeypatch):
    """Rank r of W takes global positions g = r mod W: the W rank batches of a step are the 1-rank batch."""
    steps, batch = 5, 4
    one = list(StreamSampler([1, 2, 3], steps, batch, seed=7))
    shares = []
    for r in range(2):
        monkeypatch.setattr(StreamSampler, "_rank_world", lambda self, r=r: (r, 2))
        shares.append(list(StreamSampler([1, 2, 3], steps, batch, seed=7)))
    for s in range(steps):
        step = one[s * batch : (s + 1) * batch]
        per_rank = [sh[s * batch // 2 : (s + 1) * batch // 2] for sh in shares]
        assert sorted(step) == sorted(per_rank[0] + per_rank[1])
    assert len({i for i, _ in one}) == 3
    monkeypatch.setattr(StreamSampler, "_rank_world", lambda self: (0, 3))
    with pytest.raises(ValueError, match="multiple of the ranks"):
        list(StreamSampler([1.0], 2, 4, seed=0))


def _gather_worker(rank, path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}.store", rank=rank, world_size=2)
    seen = []
    rows = score_cases(5, lambda i: (seen.append(i), [{"case": i, "rank": rank}])[1])
    torch.save({"rows": rows, "seen": seen}, f"{path}.{rank}")
    dist.destroy_process_group()


def test_score_cases_computes_each_case_once_across_two_gloo_ranks(tmp_path):
    torch.multiprocessing.spawn(_gather_worker, args=(str(tmp_path / "g"),), nprocs=2)
    parts = [torch.load(tmp_path / f"g.{r}", weights_only=True) for r in range(2)]
    assert parts[0]["seen"] == [0, 2, 4] and parts[1]["seen"] == [1, 3]
    for p in parts:  # every rank gets every row, in case order
        assert [row["case"] for row in p["rows"]] == [0, 1, 2, 3, 4]
        assert [row["rank"] for row in p["rows"]] == [0, 1, 0, 1, 0]
    assert score_cases(3, lambda i: [i]) == [0, 1, 2]  # one process: every case here


def test_few_shot_subsets_are_seeded_and_sized():
    assert few_shot_subset(60, 0.05, 0) == few_shot_subset(60, 0.05, 0)
    assert len(few_shot_subset(60, 0.05, 0)) == 3 and len(few_shot_subset(60, 0.001, 1)) == 1
    assert few_shot_subset(60, 0.05, 0) != few_shot_subset(60, 0.05, 1)
    assert few_shot_subset(5, 1.0, 3) == [0, 1, 2, 3, 4]


def test_cluster_statistic_matches_cluster_mean_and_the_plain_statistic():
    rng = np.random.default_rng(0)
    v, g = rng.normal(size=30), np.repeat(np.arange(10), 3)
    counts = resample_counts(10, 300, seed=1)
    m, s = cluster_mean(v, g, counts), cluster_statistic(v, g, counts, np.mean)
    assert (
        s.mean == pytest.approx(m.mean) and s.low == pytest.approx(m.low) and s.high == pytest.approx(m.high)
    )
    p = cluster_statistic(v, g, counts, lambda x: np.percentile(x, 30))
    assert p.mean == pytest.approx(np.percentile(v, 30)) and p.low <= p.mean <= p.high


# ------------------------------------------------------------------------------------------------ deformers
def test_bspline_deformer_matches_simpleitk_resampling():
    """The B-spline pair's fixed image is SimpleITK's resampling of the moving image through the same transform
    (pull: fixed(x) = moving(T(x))), away from the border."""
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    img = torch.from_numpy(rng.normal(size=(1, 40, 36)).astype(np.float32))
    img = torch.nn.functional.avg_pool2d(img[None], 5, 1, 2)[
        0
    ]  # smooth, so interpolation differences are small
    seed, sigma, mesh = 11, 2.0, 4
    out = make_deformer("bspline", ["image"], [], 2, bspline_sigma=sigma, bspline_mesh=mesh)(
        {"image": img}, seed
    )
    moving = sitk.GetImageFromArray(img[0].numpy().T.copy())  # sitk index (x, y) = array axes (0, 1)
    tx = sitk.BSplineTransformInitializer(moving, [mesh, mesh], 3)
    tx.SetParameters(np.random.default_rng(seed).normal(0.0, sigma, len(tx.GetParameters())).tolist())
    ref = sitk.GetArrayFromImage(sitk.Resample(moving, moving, tx, sitk.sitkLinear, 0.0)).T
    inner = (slice(8, -8), slice(8, -8))
    np.testing.assert_allclose(out.arrays["image"][0].numpy()[inner], ref[inner], atol=1e-4)
    assert out.ddf.shape == (2, 40, 36) and out.ddf.abs().max() > 1


@pytest.mark.parametrize("name", ["elastic", "bspline", "drdm-random"])
def test_deformers_are_seeded_and_keep_label_values(name):
    img = torch.rand(1, 32, 32) * 2 - 1
    lab = (torch.arange(32)[:, None] // 8 + torch.zeros(32, 32, dtype=torch.long))[None].float()
    deform = make_deformer(name, ["image"], ["label"], 2, elastic_spacing=8)
    a, b, c = (deform({"image": img, "label": lab}, s) for s in (3, 3, 4))
    assert torch.equal(a.arrays["image"], b.arrays["image"]) and not torch.equal(
        a.arrays["image"], c.arrays["image"]
    )
    assert set(a.arrays["label"].unique().tolist()) <= {0.0, 1.0, 2.0, 3.0}
    assert not torch.equal(a.arrays["image"], img)
    assert a.ddf.shape == (2, 32, 32) and not math.isnan(a.folding_pct)


@pytest.mark.parametrize("name", ["elastic", "bspline", "drdm-random"])
def test_every_deformer_returns_the_field_that_warps_its_image(name):
    """The returned field (voxels, pull) reproduces the deformed image through medfusion.fields.warp, away from the
    border: the arms' displacement sizes are comparable."""
    from medfusion.fields import warp

    img = torch.nn.functional.avg_pool2d(torch.rand(1, 1, 48, 48), 5, 1, 2)[0] * 2 - 1
    d = make_deformer(name, ["image"], [], 2, elastic_spacing=12)({"image": img}, 7)
    w = warp(img[None], d.ddf[None], mode="bilinear", padding_mode="border")[0]
    assert d.ddf.shape == (2, 48, 48) and d.ddf.abs().max() > 0.5
    assert (w - d.arrays["image"])[:, 8:-8, 8:-8].abs().max() < 1e-3


def test_a_missed_class_counts_as_the_image_diagonal():
    from medfusion.apps.downstream import label_scores

    ref = torch.zeros(1, 1, 30, 40, dtype=torch.long)
    ref[..., 5:10, 5:10], ref[..., 20:25, 20:30] = 1, 2
    pred = ref.clone()
    pred[pred == 2] = 0  # class 2 missed
    row = label_scores(pred, ref, 3, spacing=(1.0, 2.0))
    diagonal = math.hypot(30 * 1.0, 40 * 2.0)
    assert row["dice_1"] == 1 and row["dice_2"] == 0 and row["missed_classes"] == 1
    assert row["hd95"] == pytest.approx((0 + diagonal) / 2)


def test_unknown_deformer_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid: elastic, bspline, drdm-random, drdm:PATH"):
        make_deformer("affine", ["image"], [], 2)


# ------------------------------------------------------------------------------------------------ DDP
@pytest.mark.slow
def test_two_cpu_ranks_give_the_one_rank_summary(manifests, tmp_path):
    """The same command on 2 gloo ranks (DDP, ddp_spawn) and on 1: the same cases.csv, so the same summary."""
    args = ("--augment", "drdm-random", "--fractions", "0.5", "--seeds", "0", "--accelerator", "cpu")
    assert _segment(manifests, tmp_path / "one", *args, "--devices", "1") == 0
    assert _segment(manifests, tmp_path / "two", *args, "--devices", "2", "--strategy", "ddp_spawn") == 0
    one, two = _rows(tmp_path / "one" / "cases.csv"), _rows(tmp_path / "two" / "cases.csv")
    assert len(one) == len(two) > 0
    for r, s in zip(one, two):
        assert r.keys() == s.keys()
        for k in r:
            if k in ("case_id", "augmentation"):
                assert r[k] == s[k]
            else:  # floating-point summation order differs between one batch of 4 and two of 2
                assert float(r[k]) == pytest.approx(float(s[k]), abs=1e-4, nan_ok=True)
    a = json.loads((tmp_path / "one" / "summary.json").read_text())["results"]
    b = json.loads((tmp_path / "two" / "summary.json").read_text())["results"]
    assert [e["dice"]["mean"] for e in a] == pytest.approx([e["dice"]["mean"] for e in b], abs=1e-4)


def test_segment_and_register_run_in_3d(tmp_path):
    """3D volumes: the segmenter trains on random patches (--roi-size) and predicts by sliding windows; the
    registration network takes whole volume pairs."""
    from medfusion.data.builtin import make_dataset

    m = make_dataset(tmp_path / "d3", n_patients=6, dim=3, size=16, depth=8, protocols=["standard"], seed=2,
                     split=(0.5, 0.25, 0.25), progress=False)  # fmt: skip
    rc = main(["evaluate", "--task", "segment", "--manifest", str(m["segment"]), "--split", "validation",
               "--output", str(tmp_path / "s"), "--augment", "none", "--augment", "drdm-random", "--fractions", "1.0",
               "--seeds", "0", "--channels", "4", "8", "--roi-size", "8", "8", "8", *TINY])  # fmt: skip
    assert rc == 0
    rows = _rows(tmp_path / "s" / "cases.csv")
    n_val = len(json.loads(m["segment"].read_text())["validation"])
    assert len(rows) == 2 * n_val and all(0 <= float(r["dice"]) <= 1 for r in rows)
    rc = main(["evaluate", "--task", "register", "--manifest", str(m["register"]), "--split", "validation",
               "--output", str(tmp_path / "r"), "--augment", "bspline", "--seeds", "0", "--channels", "4", "4",
               *TINY])  # fmt: skip
    assert rc == 0
    arms = [r["arm"] for r in _rows(tmp_path / "r" / "cases.csv")]
    assert arms == ["before"] * (len(arms) // 2) + ["bspline"] * (len(arms) // 2) and arms
