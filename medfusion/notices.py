"""Notices that third-party packages print because of how medfusion calls them, not because of the user's data.

One place for the filters, used by the CLI and by the commands that run Lightning in-process (a module outside the
import layers, so that both ``medfusion.cli`` and ``medfusion.apps`` may use it).
"""

from __future__ import annotations

import warnings


class _NoTips:
    """A logging filter dropping Lightning's "Tip:" lines (suggestions to install its cloud-logging packages)."""

    def filter(self, record) -> bool:
        return "Tip: " not in str(record.getMessage())[:12]


def quiet_third_party() -> None:
    """Silence MONAI's deprecation notices for arguments we do not pass, MONAI's nvImageCodec probe (a GPU JPEG
    decoder we do not use; pydicom's own decoders read every file), Lightning's note that TensorBoard is not
    installed (our configs log to CSV), its internal pytree deprecation, its advertising tips for its cloud
    services, and torch's notice about an indexing idiom inside MONAI's deformation losses
    (``monai.losses.deform``). Call it inside ``warnings.catch_warnings()``."""
    import logging

    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoTips) for f in rank_zero.filters):
        rank_zero.addFilter(_NoTips())
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"monai\.")
    for message in (
        r".*NvImgCodecPydicomReader.*",
        r".*tensorboardX.*",
        r".*isinstance\(treespec, LeafSpec\).*",
        r".*non-tuple sequence for multidimensional indexing.*",
    ):
        warnings.filterwarnings("ignore", message=message)
