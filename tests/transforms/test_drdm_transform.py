"""RandDRDMDeform(d): MONAI Randomizable contract, label safety, CacheDataset, weights, 2D and 3D."""

from __future__ import annotations

import pytest
import torch
from monai.data import CacheDataset, MetaTensor
from monai.transforms import Compose

from medfusion.fields import warp
from medfusion.nets.drdm import DRDMRecoveryNet
from medfusion.transforms.drdm import RandDRDMDeform, RandDRDMDeformd, load_recovery_net


def sample(nd=2, n=32):
    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float32)] * nd, indexing="ij")
    d2 = sum((a - n / 2) ** 2 for a in axes)
    label = (d2 < (n / 3) ** 2).long() * 2 + (d2 < (n / 6) ** 2).long() * 3  # {0, 2, 5}
    image = (d2 < (n / 3) ** 2).float()
    return {"image": image[None], "label": label[None]}


def small(nd):
    return dict(ctl_size=32 if nd == 2 else 16)


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("label_mode", ["nearest", "onehot"])
def test_seeded_and_labels_follow_the_image(nd, label_mode):
    n = 32 if nd == 2 else 16
    t = RandDRDMDeformd(
        ["image", "label"], mode=("bilinear", label_mode), t_range=(30, 40), ddf_key="ddf", **small(nd)
    )
    t.set_random_state(0)
    a = t(sample(nd, n))
    t.set_random_state(0)
    b = t(sample(nd, n))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["ddf"], b["ddf"])
    assert a["ddf"].shape == (nd, *[n] * nd) and a["ddf"].abs().max() > 0.1
    assert 0.0 <= a["ddf_folding"] <= 1.0 and a["ddf_folding"] == t.last_folding
    assert set(a["label"].unique().tolist()) <= {0, 2, 5} and a["label"].dtype == torch.long
    agree = ((a["image"] > 0.5) == (a["label"] > 0)).float().mean()
    assert agree > 0.97
    c = t(sample(nd, n))
    assert not torch.equal(a["ddf"], c["ddf"])


def test_prob_zero_and_missing_keys():
    t = RandDRDMDeformd(["image", "label"], prob=0.0, **small(2))
    d = sample()
    out = t(d)
    assert out["image"] is d["image"] and t.last_folding is None
    t2 = RandDRDMDeformd(["image", "seg"], allow_missing_keys=True, **small(2))
    out = t2(sample())
    assert "seg" not in out and not torch.equal(out["image"], sample()["image"])


def test_array_transform_keeps_metatensor_and_level_zero_is_tiny():
    img = MetaTensor(sample()["image"], affine=torch.diag(torch.tensor([2.0, 3.0, 1.0, 1.0])))
    t = RandDRDMDeform(t_range=(0, 0), **small(2))
    t.set_random_state(1)
    out = t(img)
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, img.affine)
    assert t.last_ddf.abs().max() < 0.5 and t.last_folding == 0.0
    assert torch.allclose(out.as_tensor(), warp(img.as_tensor()[None], t.last_ddf[None])[0])


def test_works_after_cache_dataset():
    data = [sample() for _ in range(2)]
    tf = Compose([RandDRDMDeformd(["image", "label"], t_range=(20, 30), **small(2))])
    ds = CacheDataset(data, tf, cache_rate=1.0, progress=False)
    tf.set_random_state(3)
    first = ds[0]["image"]
    second = ds[0]["image"]
    assert not torch.equal(first, second)  # random part runs at every access, after the cache
    assert torch.equal(data[0]["image"], sample()["image"])  # cache holds the originals
    tf.set_random_state(3)
    assert torch.equal(ds[0]["image"], first)


def test_trained_net_from_exported_weights(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = DRDMRecoveryNet(2)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "net.safetensors"))
    folder = tmp_path / "export"
    folder.mkdir()
    save_file(
        {f"recovery_net.{k}": v.contiguous() for k, v in net.state_dict().items()},
        str(folder / "model.safetensors"),
    )
    (folder / "config.yaml").write_text(
        "class_path: medfusion.models.drdm.DRDM\ninit_args: {spatial_dims: 2, recursion: 2}\n"
    )
    outs = []
    for src in (net, tmp_path / "net.safetensors", folder):
        t = RandDRDMDeformd(
            ["image", "label"], t_range=(6, 6), recovery_net=src, recovery_steps=1, ddf_key="ddf", **small(2)
        )
        t.set_random_state(5)
        outs.append(t(sample())["ddf"])
    assert torch.allclose(outs[0], outs[1]) and torch.allclose(outs[0], outs[2])
    base = RandDRDMDeformd(["image"], t_range=(6, 6), ddf_key="ddf", **small(2)).set_random_state(5)(
        sample()
    )["ddf"]
    assert not torch.allclose(base, outs[0])  # the net changed the random field
    with pytest.raises(FileNotFoundError):
        load_recovery_net(tmp_path / "missing.safetensors")


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="t_range"):
        RandDRDMDeform(t_range=(50, 40))
    with pytest.raises(ValueError, match="onehot"):
        RandDRDMDeformd(["image", "label"], mode=("bilinear", "argmax"))
    with pytest.raises(ValueError, match="one entry per key"):
        RandDRDMDeformd(["image", "label"], mode=("bilinear",))
    with pytest.raises(ValueError, match="bilinear"):
        RandDRDMDeform(mode="onehot")
