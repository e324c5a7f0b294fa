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
    with pytest.raises(ValueError, match="padding_mode='edge'.*zeros, border, reflection"):
        RandDRDMDeform(padding_mode="edge")
    with pytest.raises(ValueError, match="sampler_padding='wrap'.*zeros, border, reflection"):
        RandDRDMDeformd(["image"], sampler_padding="wrap")
    with pytest.raises(ValueError, match="bilinear"):
        RandDRDMDeform(mode="onehot")


# --- image and label on different grids share one field in world space (mm) ---------------


def grid_affine(spacing, origin):
    """4x4 voxel-to-world affine (MONAI gives 4x4 for 2D files too); diagonal, signed spacing."""
    a = torch.eye(4, dtype=torch.float64)
    for d, (s, o) in enumerate(zip(spacing, origin)):
        a[d, d], a[d, 3] = s, o
    return a


def world_label(shape, aff, centre, r_out, r_in):
    """{0, 2, 5} label of two concentric balls (mm), sampled on the grid (shape, aff)."""
    nd = len(shape)
    p = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"))
    x = torch.einsum("wd,d...->w...", aff[:nd, :nd], p) + aff[:nd, 3].view(nd, *[1] * nd)
    r2 = sum((x[d] - centre[d]) ** 2 for d in range(nd))
    return ((r2 < r_out**2).long() * 2 + (r2 < r_in**2).long() * 3)[None]


def resample_nearest(label, src_aff, dst_aff, dst_shape):
    """Label (1, *src) on src grid -> (1, *dst_shape) on dst grid, nearest (test oracle, via world space)."""
    from medfusion.fields import identity_grid, sample_at
    from medfusion.fields.world import voxel_map

    nd = len(dst_shape)
    m = voxel_map(dst_aff, src_aff, nd)
    p = identity_grid(dst_shape, dtype=torch.float64)[0].reshape(nd, -1)
    q = (m.matrix @ p + m.offset[:, None]).reshape(1, nd, *dst_shape).float()
    out = sample_at(label[None].float(), q, mode="nearest")[0]
    return out if label.is_floating_point() else out.round().long()


def dice(a, b, values=(2, 5)):
    return min(float(2 * ((a == v) & (b == v)).sum() / ((a == v).sum() + (b == v).sum())) for v in values)


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("label_mode", ["nearest", "onehot"])
def test_constant_world_translation_moves_coarser_label_by_same_mm(nd, label_mode):
    n = 32 if nd == 2 else 16
    img_aff = grid_affine([1.0] * nd, [0.0] * nd)
    lab_aff = grid_affine([-2.0] + [2.0] * (nd - 1), [30.0, 5.0, -3.0][:nd])  # 2x coarser, flipped, shifted
    lab_shape = (n // 2,) * nd
    shift_mm = torch.tensor([4.0, -6.0, 2.0][:nd])
    label = world_label(lab_shape, lab_aff, [16.0, 11.0, 5.0][:nd], 9.0, 4.0)
    d = {
        "image": MetaTensor(torch.rand(1, *[n] * nd), affine=img_aff),
        "label": MetaTensor(label.clone(), affine=lab_aff),
    }
    t = RandDRDMDeformd(["image", "label"], mode=("bilinear", label_mode), **small(nd))
    ddf = shift_mm.view(nd, *[1] * nd).expand(nd, *[n] * nd).contiguous()  # image spacing 1: voxels = mm
    out = t.apply_field(d, ddf)
    # analytic: pull by shift_mm / spacing voxels of the label grid, background outside
    step = (shift_mm / torch.tensor([-2.0] + [2.0] * (nd - 1))).long().tolist()
    expected = torch.zeros_like(label)
    src = tuple(slice(max(s, 0), lab_shape[k] + min(s, 0)) for k, s in enumerate(step))
    dst = tuple(slice(max(-s, 0), lab_shape[k] + min(-s, 0)) for k, s in enumerate(step))
    expected[(slice(None), *dst)] = label[(slice(None), *src)]
    assert expected.sum() > 0 and not torch.equal(expected, label)
    assert torch.equal(out["label"].as_tensor(), expected)
    assert isinstance(out["label"], MetaTensor) and torch.equal(out["label"].affine, lab_aff)
    assert torch.equal(out["image"].affine, img_aff)


def test_random_field_on_other_grid_commutes_with_resampling():
    """Label warped on its own grid B then resampled to A == label resampled to A then warped on A."""
    n = 48
    img_aff = grid_affine([1.0, 1.0], [0.0, 0.0])
    lab_aff = grid_affine([1.25, -1.25], [0.6, n - 0.4])  # other spacing, flipped axis, other origin and size
    lab_shape = (39, 38)
    label_b = world_label(lab_shape, lab_aff, [n / 2 - 0.5, n / 2 + 0.5], n / 3, n / 5)
    label_a = resample_nearest(label_b, lab_aff, img_aff, (n, n))
    t = RandDRDMDeformd(["image", "label"], t_range=(40, 48), **small(2))
    t.set_random_state(7)
    t.randomize()
    ddf = 2.0 * t.rand.generate_field(
        torch.zeros(1, n, n)
    )  # about 1.5 voxels mean, so the test sees the field
    assert ddf.abs().mean() > 1.0
    image = MetaTensor(torch.zeros(1, n, n), affine=img_aff)
    on_b = t.apply_field({"image": image, "label": MetaTensor(label_b, affine=lab_aff)}, ddf)["label"]
    on_a = t.apply_field({"image": image, "label": MetaTensor(label_a, affine=img_aff)}, ddf)[
        "label"
    ].as_tensor()
    back = resample_nearest(on_b.as_tensor(), lab_aff, img_aff, (n, n))

    def blob_dice(a, b):  # the two blobs of the phantom: the outer ball (label > 0) and the inner one (5)
        return min(dice(a > 0, b > 0, (True,)), dice(a, b, (5,)))

    assert blob_dice(back, on_a) > 0.95
    assert blob_dice(on_a, label_a) < 0.9  # the field did move the label
    # control: moving the image-grid voxel field to grid B without re-expressing its vectors is clearly worse
    naive = t.rand.apply(label_b, resample_nearest_field(ddf, img_aff, lab_aff, lab_shape), "nearest")
    assert blob_dice(resample_nearest(naive, lab_aff, img_aff, (n, n)), on_a) < blob_dice(back, on_a) - 0.03


def resample_nearest_field(ddf, src_aff, dst_aff, dst_shape):
    """Field values moved to another grid without re-expressing the vectors (the wrong way)."""
    return torch.cat([resample_nearest(c[None], src_aff, dst_aff, dst_shape) for c in ddf])


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("label_mode", ["nearest", "onehot"])
def test_labels_on_other_grid_keep_non_contiguous_values(nd, label_mode):
    from medfusion.fields import folding_fraction

    n = 32 if nd == 2 else 16
    img_aff = grid_affine([1.0] * nd, [0.0] * nd)
    lab_aff = grid_affine([1.5] * nd, [-2.0, 3.0, 1.0][:nd])
    lab_shape = (n * 2 // 3,) * nd
    label = world_label(lab_shape, lab_aff, [n / 2] * nd, n / 3, n / 6)
    assert set(label.unique().tolist()) == {0, 2, 5}
    t = RandDRDMDeformd(
        ["image", "label"], mode=("bilinear", label_mode), t_range=(40, 48), ddf_key="ddf", **small(nd)
    )
    t.set_random_state(2)
    data = {
        "image": MetaTensor(torch.rand(1, *[n] * nd), affine=img_aff),
        "label": MetaTensor(label, affine=lab_aff),
    }
    out = t(data)
    assert out["label"].shape == label.shape and out["label"].dtype == torch.long
    assert set(out["label"].unique().tolist()) == {0, 2, 5}  # none lost, no phantom class
    if nd == 2:  # (the 16^3 field moves less than half a label voxel)
        assert not torch.equal(out["label"].as_tensor(), label)
    assert torch.equal(out["label"].as_tensor(), t.apply_field(data, out["ddf"])["label"].as_tensor())
    assert torch.equal(out["label"].affine, lab_aff) and torch.equal(out["image"].affine, img_aff)
    # folding is reported for the field on the reference (first key's) grid
    assert out["ddf"].shape == (nd, *[n] * nd)
    assert out["ddf_folding"] == float(folding_fraction(out["ddf"][None])[0]) == t.last_folding


def test_other_shape_without_affine_raises():
    t = RandDRDMDeformd(["image", "label"], **small(2))
    d = {"image": torch.rand(1, 32, 32), "label": torch.zeros(1, 16, 16, dtype=torch.long)}
    with pytest.raises(ValueError, match=r"'label'.*\(16, 16\).*\(32, 32\).*affine"):
        t(d)
    d["image"] = MetaTensor(d["image"])  # one affine is not enough
    with pytest.raises(ValueError, match="MetaTensor"):
        t(d)


@pytest.mark.parametrize("meta", [False, True])
def test_same_grid_is_the_plain_fast_path(meta):
    """Equal grids: bit-identical to warping every key with the reference field (no world-space resampling on one grid)."""
    aff = grid_affine([0.8, 1.2], [3.0, -4.0])
    raw = sample()
    data = {k: MetaTensor(v, affine=aff) if meta else v for k, v in raw.items()}
    t = RandDRDMDeformd(["image", "label"], mode=("bilinear", "onehot"), ddf_key="ddf", **small(2))
    t.set_random_state(4)
    out = t(data)
    t.set_random_state(4)
    t.randomize()
    ddf = t.rand.generate_field(raw["image"])
    assert torch.equal(out["ddf"], ddf)
    for key, mode in (("image", "bilinear"), ("label", "onehot")):
        expected = t.rand.apply(raw[key], ddf, mode)
        got = out[key].as_tensor() if meta else out[key]
        assert torch.equal(got, expected)
        if meta:
            assert torch.equal(out[key].affine, aff)
