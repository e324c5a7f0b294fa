"""Training progress display shared by ``medfusion fit`` and the demo."""

from __future__ import annotations


def step_progress_bar_class():
    """Lightning's Rich progress bar, without the ``/max_epochs - 1`` it prints as ``Epoch 9/-2`` for runs budgeted
    in steps (``max_epochs = -1``)."""
    from lightning.pytorch.callbacks import RichProgressBar

    class StepProgressBar(RichProgressBar):
        """Rich's bar, without the ``/max_epochs - 1`` it prints as ``Epoch 9/-2`` for step-budgeted runs."""

        def _get_train_description(self, current_epoch: int) -> str:
            max_epochs = self.trainer.max_epochs
            if max_epochs is not None and max_epochs > 0:
                return super()._get_train_description(current_epoch)
            steps = self.trainer.max_steps
            text = f"Epoch {current_epoch}" + (f" (step budget {steps})" if steps and steps > 0 else "")
            return f"{text:{len(self.validation_description)}}"

    return StepProgressBar
