"""Third-party notices the CLI hides: Lightning's advertising tips go, its other messages and warnings stay."""

from __future__ import annotations

import logging
import warnings

from medfusion.notices import quiet_third_party


def test_lightning_tips_are_dropped_and_other_info_kept(caplog) -> None:
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with warnings.catch_warnings():
        quiet_third_party()
        quiet_third_party()  # idempotent: one filter
        assert sum(type(f).__name__ == "_NoTips" for f in logger.filters) == 1
        with caplog.at_level(logging.INFO, logger=logger.name):
            logger.info("💡 Tip: For seamless cloud logging, try installing litlogger")
            logger.info("GPU available: False, used: False")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["GPU available: False, used: False"]


def test_deform_loss_indexing_notice_is_hidden_but_user_warnings_are_not() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party()
        warnings.warn("Using a non-tuple sequence for multidimensional indexing is deprecated", UserWarning, stacklevel=1)
        warnings.warn("scan.nii.gz: 3 slices missing", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["scan.nii.gz: 3 slices missing"]
