"""SupervisedRestorer: shapes (2D, 3D), one step lowers the loss, seeded determinism, the Restorer contract."""

from __future__ import annotations

import pytest
import torch

from medfusion import keys
from medfusion.models.base import MedfusionModule, Restorer
from medfusion.models.supervised import SupervisedRestorer


def _model(dims: int, seed: int = 0, **kw) -> SupervisedRestorer:
    torch.manual_seed(seed)
    return SupervisedRestorer(spatial_dims=dims, channels=(4, 8), strides=(2,), num_res_units=1, **kw)


def _batch(dims: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (2, 1, *([16] * dims))
    target = torch.rand(shape, generator=g) * 2 - 1
    return {keys.SOURCE: (target + 0.2 * torch.randn(shape, generator=g)).clamp(-1, 1), keys.TARGET: target}


@pytest.mark.parametrize("dims", [2, 3])
def test_shapes_identity_start_and_contract(dims):
    model = _model(dims)
    assert isinstance(model, MedfusionModule) and isinstance(model, Restorer)
    b = _batch(dims)
    out = model.restore(b[keys.SOURCE])
    assert out.shape == b[keys.SOURCE].shape and model.divisible_by == 2 and model.hu_window == (-1000.0, 1000.0)
    torch.testing.assert_close(out, b[keys.SOURCE])  # ReZero gate 0: the identity before training
    assert model.inference_options() == {"sw_batch_size": 4, "overlap": 0.25}
    with pytest.raises(ValueError, match="sw_batch_size"):
        model.check_options(steps=3)
    with pytest.raises(ValueError, match="overlap"):
        model.restore(b[keys.SOURCE], overlap=1.5)
    assert "U-Net" in model.describe()


@pytest.mark.parametrize("dims", [2, 3])
def test_one_step_lowers_the_loss_on_a_fixed_batch(dims):
    model = _model(dims, lr=1e-2)
    b = _batch(dims)
    opt = model.configure_optimizers()
    before = model.loss(b).item()
    for _ in range(3):
        opt.zero_grad()
        model.loss(b).backward()
        opt.step()
    assert model.loss(b).item() < before
    assert float(model.gate.detach()) != 0.0  # the gate left the identity


def test_seeded_determinism_and_sliding_windows():
    a, b = _model(3, seed=5, rezero=False), _model(3, seed=5, rezero=False)
    x = _batch(3)[keys.SOURCE]
    torch.testing.assert_close(a.restore(x), b.restore(x))
    assert not torch.equal(a.restore(x), _model(3, seed=6, rezero=False).restore(x))
    # one window covering the volume = whole-volume inference
    torch.testing.assert_close(a.restore(x, roi_size=(16, 16, 16)), a.restore(x))
    assert a.restore(x, roi_size=(8, 8, 8), sw_batch_size=2).shape == x.shape
    with pytest.raises(ValueError, match="3D"):
        _model(2).restore(_batch(2)[keys.SOURCE], roi_size=(8, 8))


def test_bad_arguments_name_the_valid_values():
    with pytest.raises(ValueError, match="l1"):
        SupervisedRestorer(loss="huber")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="spatial_dims"):
        SupervisedRestorer(spatial_dims=4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="strides"):
        SupervisedRestorer(channels=(4, 8, 16), strides=(2,))


def test_export_and_load_give_equal_outputs(tmp_path):
    from medfusion.models.export import export_model, load_model

    model = _model(2, rezero=False).eval()
    export_model(model, tmp_path / "sup")
    again = load_model(tmp_path / "sup").eval()
    x = _batch(2)[keys.SOURCE]
    torch.testing.assert_close(again.restore(x), model.restore(x))
