"""eval.registration: one call computes Dice per label, folding %, SDlogJ and displacement scale."""

from __future__ import annotations

import pytest
import torch

from medfusion.eval.registration import dice_per_label, evaluate_registration
from medfusion.fields import warp_labels


def test_known_translation_registers_exactly():
    n = 32
    x = torch.arange(n)
    label = torch.zeros(1, 1, n, n, dtype=torch.long)
    label[..., 10:20, 8:14] = 2
    label[..., 12:16, 20:26] = 5
    fixed = torch.roll(label, shifts=3, dims=2)  # content moved +3 along axis 0
    ddf = torch.zeros(1, 2, n, n)
    ddf[:, 0] = -3.0  # pull: warped(x) = moving(x - 3)
    warped = warp_labels(label, ddf)
    m = evaluate_registration(ddf, warped, fixed, mask=(fixed > 0))
    assert m.dice == {2: 1.0, 5: 1.0} and m.mean_dice == 1.0
    assert m.folding_pct == 0.0 and m.folding_mask_pct == 0.0 and m.sdlogj < 1e-6
    assert m.disp_mean_pct == pytest.approx(300 / n) and m.disp_max_pct == pytest.approx(300 / n)
    del x


def test_dice_values_and_errors():
    a = torch.tensor([[0, 2, 2, 5]])
    b = torch.tensor([[0, 2, 5, 5]])
    d = dice_per_label(a, b)
    assert d[2] == pytest.approx(2 / 3) and d[5] == pytest.approx(2 / 3) and 0 not in d
    assert dice_per_label(a, b, labels=[7]) == {7: 1.0}
    with pytest.raises(ValueError, match="same shape"):
        dice_per_label(a, b[:, :3])
    with pytest.raises(ValueError, match="both"):
        evaluate_registration(torch.zeros(1, 2, 4, 4), warped_label=a)
