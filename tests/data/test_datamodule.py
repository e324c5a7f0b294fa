"""ManifestDataModule: batches, caching, per-rank seeding, unpadded evaluation sharding, and real 2-process DDP."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medfusion.data.datamodule import ManifestDataModule, UnpaddedDistributedSampler
from medfusion.data.manifest import write_manifest

N_TRAIN, N_VAL, N_TEST = 6, 5, 2


def _dataset(root: Path, dim: int = 3) -> Path:
    """Paired source/target cases: target = source + 100 HU; `case_id` = pNN; manifest.json in `root`."""
    rng = np.random.default_rng(0)
    entries = []
    for i in range(N_TRAIN + N_VAL + N_TEST):
        shape = (12, 12, 6) if dim == 3 else (12, 12)
        vol = rng.uniform(-400, 400, size=shape).astype(np.float32) + 10 * i
        for name, data in (("source", vol), ("target", vol + 100.0)):
            path = root / f"p{i:02d}" / f"{name}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
        entries.append(
            {
                "source": str(root / f"p{i:02d}/source.nii.gz"),
                "target": str(root / f"p{i:02d}/target.nii.gz"),
                "protocol": "sharp",
                "case_id": f"p{i:02d}",
            }
        )
    splits = {
        "training": entries[:N_TRAIN],
        "validation": entries[N_TRAIN : N_TRAIN + N_VAL],
        "test": entries[N_TRAIN + N_VAL :],
    }
    return write_manifest(root / "manifest.json", splits, task="standardize")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return _dataset(tmp_path_factory.mktemp("dm"))


def _dm(manifest: Path, **kw) -> ManifestDataModule:
    args = dict(manifest=str(manifest), task="standardize", spatial_dims=2, roi_size=[8, 8], batch_size=2)
    args.update(kw)
    return ManifestDataModule(**args)


def test_batches_have_keys_shapes_ranges_and_plain_tensors(manifest: Path) -> None:
    dm = _dm(manifest, num_samples=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) >= {"source", "target", "protocol", "case_id"}
    assert tuple(batch["source"].shape) == (4, 1, 8, 8)  # batch_size * num_samples
    assert type(batch["source"]) is torch.Tensor  # no MetaTensor inside models
    assert batch["source"].min() >= -1 and batch["source"].max() <= 1
    torch.testing.assert_close(batch["target"] - batch["source"], torch.full_like(batch["source"], 0.1))
    assert batch["protocol"] == ["sharp"] * 4 and len(batch["case_id"]) == 4
    val = list(dm.val_dataloader())
    assert sum(len(b["case_id"]) for b in val) == N_VAL
    assert tuple(val[0]["source"].shape) == (2, 1, 8, 8)
    dm.setup("test")
    assert [c for b in dm.test_dataloader() for c in b["case_id"]] == ["p11", "p12"]
    assert [c for b in dm.predict_dataloader() for c in b["case_id"]] == ["p11", "p12"]


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_cached_datasets_give_the_same_batches(manifest: Path, tmp_path: Path, cache: str) -> None:
    ref = _dm(manifest, spatial_dims=3, roi_size=[8, 8, 4])
    cached = _dm(manifest, spatial_dims=3, roi_size=[8, 8, 4], cache=cache, cache_dir=str(tmp_path / "c"))
    for dm in (ref, cached):
        dm.setup("fit")
    for a, b in zip(ref.val_dataloader(), cached.val_dataloader()):
        torch.testing.assert_close(a["source"], b["source"])
    a, b = next(iter(ref.train_dataloader())), next(iter(cached.train_dataloader()))  # same seed, same crops
    torch.testing.assert_close(a["source"], b["source"])
    if cache == "disk":
        assert any((tmp_path / "c").rglob("*.pt"))


def test_memory_cache_is_never_modified_by_the_random_part(manifest: Path) -> None:
    dm = _dm(manifest, cache="memory", num_samples=2)
    dm.setup("fit")
    cache = dm._datasets["training"]._cache
    before = [{k: v.clone() for k, v in item.items() if isinstance(v, torch.Tensor)} for item in cache]
    for batch in dm.train_dataloader():
        batch["source"].add_(1.0)  # a model writing into its batch must not reach the cache
    for item, ref in zip(cache, before):
        for key, value in ref.items():
            assert torch.equal(item[key], value), key


@pytest.mark.parametrize("num_workers, persistent", [(0, False), (1, False), (1, True)])
def test_training_is_reproducible_and_augmentation_varies_by_epoch(
    manifest: Path, num_workers: int, persistent: bool
) -> None:
    def two_epochs(dm: ManifestDataModule) -> list[torch.Tensor]:
        dm.setup("fit")
        loader = dm.train_dataloader()
        return [torch.cat([b["source"] for b in loader]) for _ in range(2)]

    kw = dict(num_workers=num_workers, persistent_workers=persistent)
    first = two_epochs(_dm(manifest, seed=3, **kw))
    again = two_epochs(_dm(manifest, seed=3, **kw))
    other = two_epochs(_dm(manifest, seed=4, **kw))
    torch.testing.assert_close(first[0], again[0])
    torch.testing.assert_close(first[1], again[1])
    assert not torch.equal(first[0], first[1])  # a new epoch draws new crops/slices/order
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("num_workers", [0, 1])
def test_an_epoch_is_a_function_of_seed_rank_and_epoch_alone(manifest: Path, num_workers: int) -> None:
    """Epoch 2 drawn by a fresh loader (a run resumed at epoch 2) equals epoch 2 drawn after epochs 0 and 1, and
    differs from epoch 0: the sampler's ``set_epoch`` (Lightning calls it every epoch) reseeds the order, the
    in-process transforms and the workers' seeds."""

    def epochs(dm: ManifestDataModule, which: list[int]) -> list[tuple[list[str], torch.Tensor]]:
        dm.setup("fit")
        loader = dm.train_dataloader()
        drawn = []
        for epoch in which:
            loader.sampler.set_epoch(epoch)
            batches = list(loader)
            drawn.append(
                ([c for b in batches for c in b["case_id"]], torch.cat([b["source"] for b in batches]))
            )
        return drawn

    kw = dict(seed=5, num_workers=num_workers)
    e0, _, e2 = epochs(_dm(manifest, **kw), [0, 1, 2])
    (resumed,) = epochs(_dm(manifest, **kw), [2])
    assert resumed[0] == e2[0]  # the same order
    torch.testing.assert_close(resumed[1], e2[1], rtol=0, atol=0)  # the same crops
    assert e0[0] != e2[0] or not torch.equal(e0[1], e2[1])


def test_dataloader_workers_draw_different_augmentations(manifest: Path) -> None:
    root = manifest.parent
    one_case = {
        "source": str(root / "p00/source.nii.gz"),
        "target": str(root / "p00/target.nii.gz"),
        "case_id": "p00",
    }
    same = write_manifest(
        manifest.parent / "same_case.json",
        {"training": [dict(one_case) for _ in range(4)]},
        task="standardize",
        overwrite=True,
    )
    dm = _dm(same, batch_size=1, num_workers=2)
    dm.setup("fit")
    b0, b1, b2, b3 = [b["source"] for b in dm.train_dataloader()]  # batches alternate between the 2 workers
    assert not (torch.equal(b0, b1) and torch.equal(b2, b3))  # identical worker seeds would repeat crops


def test_ranks_get_disjoint_training_cases_different_augmentation_and_unpadded_evaluation(
    manifest: Path, monkeypatch
) -> None:
    per_rank = {}
    for rank in (0, 1):
        dm = _dm(manifest, batch_size=1)
        monkeypatch.setattr(dm, "_rank_world", lambda rank=rank: (rank, 2))
        dm.setup("fit")
        train = dm.train_dataloader()
        train.sampler.set_epoch(0)
        cases = [c for b in train for c in b["case_id"]]
        same_case = dm._datasets["training"][0][0]["source"]  # one case through this rank's random transforms
        val = [c for b in dm.val_dataloader() for c in b["case_id"]]
        per_rank[rank] = (cases, same_case, val)
    (t0, x0, v0), (t1, x1, v1) = per_rank[0], per_rank[1]
    assert len(t0) == len(t1) == N_TRAIN // 2 and not set(t0) & set(t1)
    assert not torch.equal(x0, x1)  # per-rank seeding of the random transforms
    assert sorted(v0 + v1) == [f"p{i:02d}" for i in range(N_TRAIN, N_TRAIN + N_VAL)]  # each case exactly once
    assert (len(v0), len(v1)) == (3, 2)


def test_unpadded_sampler_covers_each_index_once() -> None:
    for n, world in ((5, 2), (7, 3), (2, 4)):
        parts = [list(UnpaddedDistributedSampler(range(n), num_replicas=world, rank=r)) for r in range(world)]
        assert sorted(i for p in parts for i in p) == list(range(n))
        assert [
            len(UnpaddedDistributedSampler(range(n), num_replicas=world, rank=r)) for r in range(world)
        ] == [len(p) for p in parts]


def test_bad_arguments_raise(manifest: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="valid tasks"):
        _dm(manifest, task="denoise")
    with pytest.raises(ValueError, match="valid: none, memory, disk"):
        _dm(manifest, cache="gpu")
    with pytest.raises(ValueError, match="cache_dir"):
        _dm(manifest, cache="disk")
    with pytest.raises(ValueError, match="persistent_workers=True needs num_workers > 0"):
        _dm(manifest, persistent_workers=True)
    with pytest.raises(ValueError, match="roi_size"):
        _dm(manifest, roi_size=[8, 8, 8])
    dm = _dm(manifest, task="segment")  # the manifest is a standardize manifest
    with pytest.raises(ValueError, match="declares task 'standardize'"):
        dm.setup("fit")


def test_lightning_validate_counts_every_case_once(manifest: Path) -> None:
    import lightning as L

    class Count(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.cases: list[str] = []

        def validation_step(self, batch, batch_idx):
            self.cases += batch["case_id"]
            self.log("n", float(len(batch["case_id"])), reduce_fx="sum", batch_size=len(batch["case_id"]))

    model = Count()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.validate(model, datamodule=_dm(manifest))
    assert sorted(model.cases) == [f"p{i:02d}" for i in range(N_TRAIN, N_TRAIN + N_VAL)]
    assert trainer.callback_metrics["n"].item() == N_VAL


DDP_SCRIPT = """
import json, sys
import lightning as L
import torch
from medfusion.data.datamodule import ManifestDataModule

manifest, out = sys.argv[1], sys.argv[2]


class Probe(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.train_cases, self.val_cases = [], []

    def training_step(self, batch, batch_idx):
        self.train_cases.append([self.current_epoch, batch["case_id"], float(batch["source"].sum())])
        return (self.w - batch["source"].mean()) ** 2

    def validation_step(self, batch, batch_idx):
        self.val_cases.append([self.current_epoch, batch["case_id"]])
        self.log("n_val", float(len(batch["case_id"])), reduce_fx="sum", sync_dist=True,
                 batch_size=len(batch["case_id"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_fit_end(self):
        record = {"rank": self.global_rank, "world": self.trainer.world_size, "train": self.train_cases,
                  "val": self.val_cases, "n_val": float(self.trainer.callback_metrics["n_val"])}
        with open(f"{out}/rank{self.global_rank}.json", "w") as f:
            json.dump(record, f)


if __name__ == "__main__":
    dm = ManifestDataModule(manifest=manifest, task="standardize", spatial_dims=2, roi_size=[8, 8],
                            batch_size=1, num_workers=1, seed=0)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(Probe(), datamodule=dm)
"""


@pytest.mark.slow
def test_two_process_ddp_gloo(manifest: Path, tmp_path: Path) -> None:
    """Real DDP (2 CPU ranks, gloo) in a subprocess: plain "ddp" inside pytest would re-run pytest."""
    script = tmp_path / "ddp_probe.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    proc = subprocess.run(
        [sys.executable, str(script), str(manifest), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    val_ids = [f"p{i:02d}" for i in range(N_TRAIN, N_TRAIN + N_VAL)]
    for epoch in (0, 1):
        train = [[c for e, cs, _ in r["train"] if e == epoch for c in cs] for r in ranks]
        assert len(train[0]) == len(train[1]) == N_TRAIN // 2
        assert not set(train[0]) & set(train[1])  # ranks see different training cases
        val = [c for r in ranks for e, cs in r["val"] if e == epoch for c in cs]
        assert sorted(val) == val_ids  # every validation case exactly once, no padding duplicates
    for r in ranks:  # the synced metric counts each validation case once
        assert r["n_val"] == N_VAL
    epoch_orders = [[cs for e, cs, _ in ranks[0]["train"] if e == epoch] for epoch in (0, 1)]
    sums = [[s for e, _, s in ranks[0]["train"] if e == epoch] for epoch in (0, 1)]
    assert epoch_orders[0] != epoch_orders[1] or sums[0] != sums[1]  # reshuffled / re-augmented per epoch


def _segment_dataset(root: Path) -> Path:
    """3D image/label cases (a bright box labelled 1) for the label-aware random crops."""
    rng = np.random.default_rng(1)
    entries = []
    for i in range(5):
        image = rng.uniform(-300, 300, size=(12, 12, 6)).astype(np.float32)
        label = np.zeros((12, 12, 6), np.uint8)
        label[3 + i : 7 + i, 2:6, 1:4] = 1
        image[label > 0] += 400
        for name, data in (("image", image), ("label", label)):
            nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.0, 1.0])), str(root / f"s{i}_{name}.nii.gz"))
        entries.append(
            {"image": str(root / f"s{i}_image.nii.gz"), "label": str(root / f"s{i}_label.nii.gz"), "case_id": f"s{i}"}
        )
    return write_manifest(root / "segment.json", {"training": entries[:3], "validation": entries[3:]}, task="segment")


@pytest.mark.parametrize("cache", ["none", "memory", "disk"])
@pytest.mark.parametrize("kind", ["2d-slices", "3d-labels"])
def test_random_half_without_metadata_tracking_gives_the_same_batches(
    manifest: Path, tmp_path: Path, monkeypatch, cache: str, kind: str
) -> None:
    """The random half runs with MONAI's metadata tracking off (``UntrackedRandomCompose``, for speed): the batches
    of two epochs equal those of a plain ``Compose`` over the same transforms, bit for bit, and the process-wide
    switch is back on afterwards."""
    from monai.data import get_track_meta
    from monai.transforms import Compose

    import medfusion.data.datamodule as dmod

    if kind == "2d-slices":
        kw = dict(manifest=str(manifest), task="standardize", spatial_dims=2, roi_size=[8, 8], num_samples=2)
    else:
        seg = _segment_dataset(tmp_path)
        kw = dict(manifest=str(seg), task="segment", spatial_dims=3, roi_size=[6, 6, 4], num_samples=2)

    def epochs(tag: str) -> list[dict]:
        dm = ManifestDataModule(batch_size=2, cache=cache, cache_dir=str(tmp_path / f"c_{tag}"), seed=5, **kw)
        dm.setup("fit")
        loader = dm.train_dataloader()
        out = [b for _ in range(2) for b in loader] + list(dm.val_dataloader())
        assert get_track_meta()
        return out

    seen = []
    real_call = dmod.UntrackedRandomCompose.__call__

    def spy(self, input_, start=0, end=None, threading=False, lazy=None):
        seen.append(get_track_meta())
        return real_call(self, input_, start, end, threading, lazy)

    monkeypatch.setattr(dmod.UntrackedRandomCompose, "__call__", spy)
    untracked = epochs("untracked")
    monkeypatch.setattr(dmod, "UntrackedRandomCompose", Compose)
    tracked = epochs("tracked")
    assert seen and all(seen)  # it was called with tracking on and restored it each time
    assert len(untracked) == len(tracked)
    for a, b in zip(untracked, tracked):
        assert set(a) == set(b)
        for key, value in a.items():
            if isinstance(value, torch.Tensor):
                assert type(value) is torch.Tensor, key
                assert torch.equal(value, b[key]), key
            else:
                assert value == b[key], key


def test_untracked_compose_turns_tracking_off_only_in_the_random_half() -> None:
    from monai.data import MetaTensor, get_track_meta
    from monai.transforms import MapTransform, RandomizableTransform

    import medfusion.data.datamodule as dmod

    states = []

    class Det(MapTransform):
        def __call__(self, d):
            states.append(("det", get_track_meta()))
            return d

    class Rnd(RandomizableTransform):
        def __call__(self, d):
            states.append(("rnd", get_track_meta()))
            return d

    compose = dmod.UntrackedRandomCompose([Det(keys="x"), Rnd(), Det(keys="x")])
    data = {"x": MetaTensor(torch.zeros(1, 2, 2))}
    compose(data)
    assert states == [("det", True), ("rnd", False), ("det", False)]
    states.clear()
    compose(data, end=1)  # what a cache computes
    compose(data, start=1)  # what it runs per draw
    assert states == [("det", True), ("rnd", False), ("det", False)]
    assert get_track_meta()
