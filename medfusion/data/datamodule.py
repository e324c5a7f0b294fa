"""``ManifestDataModule``: a LightningDataModule built from a manifest (``medfusion.data.manifest``).

One class for every task and for 2D and 3D: the manifest's task decides the keys (``TASK_KEYS`` plus any other
path key present in every entry, e.g. an optional ``label``), ``medfusion.data.pipelines.build_transforms``
builds the pipeline, and ``cache`` decides where its deterministic half is cached (``CacheDataset`` in memory,
``PersistentDataset`` on disk); the random half (crops, slice sampling) runs after the cache, every epoch, on
tensors without MONAI's metadata tracking (:class:`UntrackedRandomCompose`: the tracking was most of its time).

Batches are dicts keyed by ``medfusion.keys`` names: image/label keys are plain ``torch.Tensor`` of shape
``(B, 1, *spatial)`` (images in [-1, 1], see ``pipelines``); string keys (``protocol``, ``case_id``) become lists.

Distributed training, all without relying on Lightning's sampler injection:

* training: an :class:`EpochSeededSampler` (a ``DistributedSampler``, also with one rank) gives each rank
  different cases, shuffled anew every epoch; its ``set_epoch``, which Lightning calls at the start of every epoch,
  reseeds the random transforms from ``(seed, rank, epoch)`` and the loader's generator, from which each epoch's
  dataloader workers take their seeds (``base_seed + worker_id``, applied through MONAI's ``set_rnd``), from the
  same triple. An epoch's order and crops are thus a function of ``(seed, rank, epoch)`` alone: a run resumed
  from a checkpoint at epoch ``k`` replays epoch ``k``'s stream, as the uninterrupted run does (not with
  ``persistent_workers``, whose workers are seeded once). The epoch is the one Lightning passes to ``set_epoch``;
  Lightning 2.6 restarts a ``max_steps`` run from an end-of-epoch checkpoint with an epoch count one batch (no
  validation) or one epoch (with validation) off the uninterrupted run's, which no sampler can undo.
* validation / test / predict: :class:`UnpaddedDistributedSampler` hands rank ``r`` the cases ``r, r + W, ...``,
  so every case is evaluated exactly once: no padding duplicates biasing the metrics. Ranks may then run a
  different number of steps: log metrics with ``on_epoch=True, sync_dist=True, batch_size=B`` (Lightning then
  forms the sample-weighted mean) and avoid per-step collectives in ``validation_step``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from monai.data import (
    CacheDataset,
    Dataset,
    PersistentDataset,
    get_track_meta,
    list_data_collate,
    set_track_meta,
)
from monai.data.utils import set_rnd
from monai.transforms import Compose, EnsureTyped, RandomizableTrait, Transform
from monai.utils.misc import MAX_SEED
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

from medfusion.data.manifest import LABEL_KEYS, TASK_KEYS, Manifest, load_manifest
from medfusion.data.pipelines import build_transforms

CACHE_MODES = ("none", "memory", "disk")


def _is_random(t) -> bool:
    """MONAI's own test for where a dataset's cache ends (``CacheDataset``, ``PersistentDataset``)."""
    return isinstance(t, RandomizableTrait) or not isinstance(t, Transform)


class UntrackedRandomCompose(Compose):
    """A ``Compose`` that runs its transforms from the first random one on without metadata tracking.

    The deterministic half (loading, orientation, spacing, HU window) needs the affines and is what the datasets
    cache; the random half after it only crops and samples slices, and the training batches are plain tensors
    anyway (``EnsureTyped(track_meta=False)`` ends the pipeline). In that half MONAI's ``MetaTensor``
    bookkeeping (``__torch_function__``, ``copy_meta_from``, the applied-operations stack) cost most of the time
    (``bench/loader_headroom.py``), so it runs under ``set_track_meta(False)``. MONAI's switch is process-global:
    it is set only for the duration of that call and restored after, which is safe where the pipeline runs in
    the main thread between training steps or in DataLoader worker processes (not under a ``ThreadDataLoader``).

    The transforms, their order and the way ``set_random_state`` seeds them are those of a plain ``Compose``
    over the same list, so the batches are the same (tested).
    """

    def __call__(self, input_, start=0, end=None, threading=False, lazy=None):
        first = self.get_index_of_first(_is_random)
        stop = len(self.transforms) if end is None else end
        if first is None or stop <= first:
            return super().__call__(input_, start=start, end=end, threading=threading, lazy=lazy)
        if start < first:
            input_ = super().__call__(input_, start=start, end=first, threading=threading, lazy=lazy)
            start = first
        previous = get_track_meta()
        set_track_meta(False)
        try:
            return super().__call__(input_, start=start, end=end, threading=threading, lazy=lazy)
        finally:
            set_track_meta(previous)


class UnpaddedDistributedSampler(DistributedSampler):
    """Rank ``r`` of ``W`` gets indices ``r, r + W, r + 2W, ...`` in order: each sample exactly once overall.

    A ``DistributedSampler`` subclass, so Lightning leaves it in place instead of injecting its padding one.
    """

    def __init__(self, dataset, num_replicas: int | None = None, rank: int | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.total_size = len(dataset)  # type: ignore[arg-type]
        self.num_samples = len(range(self.rank, self.total_size, self.num_replicas))

    def __iter__(self):
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


def _derive_seed(*parts: int) -> int:
    """A well-mixed 31-bit seed from integers (numpy ``SeedSequence``)."""
    return int(np.random.SeedSequence([int(p) % (2**63) for p in parts]).generate_state(1)[0]) % MAX_SEED


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: reseed the dataset's random transforms from this worker's torch seed.

    The torch seed is ``base_seed + worker_id`` with ``base_seed`` drawn from the loader's generator when an
    epoch's workers start; :class:`EpochSeededSampler` reseeds that generator from ``(seed, rank, epoch)``, so the
    seed differs across workers, epochs and ranks and is a function of them alone.
    """
    info = torch.utils.data.get_worker_info()
    if info is not None:
        set_rnd(getattr(info.dataset, "transform", info.dataset), seed=int(info.seed) % MAX_SEED)
        np.random.seed(int(info.seed) % MAX_SEED)


class EpochSeededSampler(DistributedSampler):
    """Training sampler whose epoch ``e`` is a function of ``(seed, rank, e)`` alone, whatever ran before it.

    The order is ``DistributedSampler``'s (a permutation drawn with ``seed + e``, the same on every rank, rank
    ``r`` of ``W`` taking every ``W``-th index). :meth:`set_epoch` also reseeds the in-process random transforms
    (``num_workers=0``) and ``generator``, the loader's, from which the epoch's workers take their seeds.

    Args:
        dataset: a MONAI dataset (its ``transform`` is reseeded).
        generator: the ``DataLoader``'s ``generator``.
        seed: the run's seed.
        rank / num_replicas: this process's rank and the world size (1 without distributed training).
        epoch: the epoch the first iteration belongs to (a resumed run starts at its checkpoint's epoch).
    """

    def __init__(
        self,
        dataset,
        *,
        generator: torch.Generator,
        seed: int,
        rank: int = 0,
        num_replicas: int = 1,
        epoch: int = 0,
    ) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False
        )
        self.generator = generator
        self._seeded_epoch: int | None = None
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Draw epoch ``epoch``: its order, its transforms' and workers' seeds. Calling it again for the epoch
        already set changes nothing (Lightning starts the first epoch's iterator, which may have drawn a batch
        already, before it calls ``set_epoch``)."""
        super().set_epoch(epoch)
        if epoch == self._seeded_epoch:
            return
        self._seeded_epoch = epoch
        set_rnd(self.dataset.transform, seed=_derive_seed(self.seed, self.rank, epoch))
        self.generator.manual_seed(_derive_seed(self.seed, self.rank, epoch, 1))


class ManifestDataModule(L.LightningDataModule):
    """Train / validation / test / predict loaders for one manifest.

    Args:
        manifest: path of the manifest (``.json`` Decathlon datalist or ``.csv``).
        task: one of ``medfusion.data.manifest.TASK_KEYS`` (standardize, restore, segment, register, image).
        spatial_dims: 2 (slices; 3D volumes are sliced along ``slice_axis``) or 3.
        hu_window: (low, high) intensities (HU for CT) mapped to [-1, 1].
        pixdim: resample to this spacing in mm (per axis), or None for native spacing.
        roi_size: crop size in voxels (``spatial_dims`` values), or None (whole images; then cases of different
            sizes need ``batch_size=1``).
        crop_foreground: crop each case to its foreground (intensity above the window's low end) before the
            random crops. Turn it off when a model is applied to whole images at inference (e.g. a network with
            GroupNorm, whose statistics depend on how much background the input holds).
        num_samples: random crops / slices per loaded case in training (a batch holds ``batch_size *
            num_samples`` samples).
        batch_size: cases per training batch; ``val_batch_size`` for evaluation (default ``batch_size``).
        num_workers: dataloader worker processes.
        persistent_workers: keep the training loader's workers alive across epochs (needs ``num_workers > 0``).
            Off by default: then every epoch starts fresh workers seeded from (seed, rank, epoch) (see
            :class:`EpochSeededSampler`), which makes an epoch's crops a function of those alone. On: the workers
            are seeded once and their random transforms continue their streams (crops still differ across epochs,
            workers and ranks, but a run resumed from a checkpoint draws other crops than the uninterrupted run),
            which saves the worker start-up per epoch: worth it when epochs are a few steps long (small datasets,
            large batches on a GPU).
        cache: where to cache the deterministic part: ``none``, ``memory`` (CacheDataset) or ``disk``
            (PersistentDataset in ``cache_dir``, a sub-folder per pipeline configuration).
        cache_dir: folder for ``cache="disk"``.
        seed: seed of the training shuffle and of the random transforms.
        slice_axis: axis of 3D volumes that 2D slices are taken along.
        allow_outside: accept manifest paths outside the manifest's folder.
    """

    def __init__(
        self,
        manifest: str,
        task: str,
        spatial_dims: int = 2,
        hu_window: tuple[float, float] = (-1000.0, 1000.0),
        pixdim: list[float] | None = None,
        roi_size: list[int] | None = None,
        crop_foreground: bool = True,
        num_samples: int = 1,
        batch_size: int = 4,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        persistent_workers: bool = False,
        cache: Literal["none", "memory", "disk"] = "none",
        cache_dir: str | None = None,
        seed: int = 0,
        slice_axis: int = 2,
        allow_outside: bool = False,
    ) -> None:
        super().__init__()
        if task not in TASK_KEYS:
            raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASK_KEYS)}")
        if cache not in CACHE_MODES:
            raise ValueError(f"unknown cache {cache!r}; valid: {', '.join(CACHE_MODES)}")
        if cache == "disk" and not cache_dir:
            raise ValueError("cache='disk' needs cache_dir")
        if batch_size < 1 or (val_batch_size is not None and val_batch_size < 1):
            raise ValueError(f"batch sizes must be >= 1, got {batch_size}, {val_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if persistent_workers and num_workers == 0:
            raise ValueError("persistent_workers=True needs num_workers > 0 (there are no workers to keep)")
        # logger=False: LightningCLI already saves the full config; logging would merge these hparams with the
        # model's and fail on shared names with other meanings (e.g. a model's sliding-window ``roi_size``)
        self.save_hyperparameters(logger=False)
        self.manifest_path = manifest
        self.task = task
        self.spatial_dims = spatial_dims
        self.hu_window = tuple(float(v) for v in hu_window)
        self.pixdim = list(pixdim) if pixdim is not None else None
        self.roi_size = list(roi_size) if roi_size is not None else None
        self.crop_foreground = crop_foreground
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.persistent_workers = persistent_workers
        self.cache = cache
        self.cache_dir = cache_dir
        self.seed = seed
        self.slice_axis = slice_axis
        self.allow_outside = allow_outside
        self._manifest: Manifest | None = None
        self._datasets: dict[str, Dataset] = {}
        # fail early on bad pipeline arguments (cheap: builds transforms, reads nothing)
        build_transforms(TASK_KEYS[task], **self._pipeline_kwargs(train=True))

    # --- manifest and datasets ---------------------------------------------------------------------------

    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            self._manifest = load_manifest(
                self.manifest_path, task=self.task, allow_outside=self.allow_outside
            )
        return self._manifest

    @property
    def keys(self) -> tuple[str, ...]:
        """Keys loaded as images/labels: the task's keys plus path keys present in every manifest entry."""
        required = TASK_KEYS[self.task]
        return required + tuple(k for k in self.manifest.path_keys if k not in required)

    def _pipeline_kwargs(self, train: bool) -> dict:
        return dict(
            spatial_dims=self.spatial_dims,
            hu_window=self.hu_window,
            pixdim=self.pixdim,
            roi_size=self.roi_size,
            num_samples=self.num_samples,
            crop_foreground=self.crop_foreground,
            train=train,
            slice_axis=self.slice_axis,
        )

    def build_dataset(self, split: str, train: bool) -> Dataset:
        """The MONAI dataset of manifest split ``split`` (``training``/``validation``/``test``)."""
        items = self.manifest.split(split)
        if not items:
            raise ValueError(
                f"{self.manifest_path}: split {split!r} is absent; the manifest has {list(self.manifest.splits)}"
            )
        keys = self.keys
        common = set.intersection(*(set(e) for e in items))  # ragged pass-through keys would break collation
        data = [{k: v for k, v in e.items() if k in common} for e in items]
        det, rnd = build_transforms(keys, **self._pipeline_kwargs(train=train))
        to_plain = EnsureTyped(list(keys), data_type="tensor", track_meta=False)
        transform = UntrackedRandomCompose([*det.transforms, *rnd.transforms, to_plain])
        if self.cache == "memory":
            # copy_cache=False: the part after the cache only crops (views) / squeezes / drops keys and the
            # collate function stacks into new tensors, so cached items are never modified; deep-copying every
            # cached volume (and its label indices) per draw was the main cost of an epoch
            return CacheDataset(
                data, transform=transform, cache_rate=1.0, num_workers=None, progress=False, copy_cache=False
            )
        if self.cache == "disk":
            config = {
                "keys": keys,
                "labels": [k for k in keys if k in LABEL_KEYS],
                **self._pipeline_kwargs(train),
            }
            config.pop("num_samples")  # only the cached (deterministic) part matters; it pads to roi_size and
            # (train with labels) stores label indices, so roi_size and train stay in the key
            digest = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
            return PersistentDataset(data, transform=transform, cache_dir=Path(self.cache_dir) / digest)
        return Dataset(data, transform=transform)

    def setup(self, stage: str | None = None) -> None:
        wanted = {
            "fit": [("training", True), ("validation", False)],
            "validate": [("validation", False)],
            "test": [("test", False)],
            "predict": [("test", False)],
            None: [("training", True), ("validation", False), ("test", False)],
        }
        if stage not in wanted:
            raise ValueError(f"unknown stage {stage!r}; valid: fit, validate, test, predict")
        for split, train in wanted[stage]:
            if split not in self._datasets and self.manifest.split(split):  # absent splits: error on use
                self._datasets[split] = self.build_dataset(split, train)

    def _dataset(self, split: str, train: bool) -> Dataset:
        if split not in self._datasets:
            self._datasets[split] = self.build_dataset(split, train)
        return self._datasets[split]

    # --- distributed context ----------------------------------------------------------------------------

    def _epoch(self) -> int:
        """The epoch the fit loop is at (restored from a checkpoint on resume; the value it passes to the
        sampler's ``set_epoch``), 0 without a trainer."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0
        return int(trainer.fit_loop.epoch_progress.current.processed)

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    # --- loaders -------------------------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        dataset = self._dataset("training", train=True)
        rank, world = self._rank_world()
        generator = torch.Generator()
        sampler = EpochSeededSampler(
            dataset, generator=generator, seed=self.seed, rank=rank, num_replicas=world, epoch=self._epoch()
        )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=list_data_collate,
            worker_init_fn=seed_worker,
            generator=generator,
            persistent_workers=self.persistent_workers,
        )

    def _eval_dataloader(self, split: str) -> DataLoader:
        dataset = self._dataset(split, train=False)
        rank, world = self._rank_world()
        if world > 1:
            if len(dataset) < world:
                raise ValueError(
                    f"{self.manifest_path}: split {split!r} has {len(dataset)} case(s) for {world} ranks; every "
                    "rank needs at least one (no duplicates are padded in)"
                )
            sampler = UnpaddedDistributedSampler(dataset, num_replicas=world, rank=rank)
        else:
            sampler = SequentialSampler(dataset)
        return DataLoader(
            dataset,
            batch_size=self.val_batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=list_data_collate,
            worker_init_fn=seed_worker,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_dataloader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._eval_dataloader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_dataloader("test")
