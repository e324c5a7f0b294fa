"""Exit status of every ``medfusion`` command, one table for all of them.

Batch commands (``convert``, ``standardize``, ``restore``, ``augment``, ``make-data``, ``manifest``, ``export``)
go on past a bad input, report it with its path and reason, and end with one of these codes.
"""

from __future__ import annotations

EXIT_OK = 0
"""Every input was processed (or, with ``--resume``, was already done)."""
EXIT_SOME_FAILED = 1
"""Some inputs failed (each reported with its reason); the others were written."""
EXIT_NOTHING_DONE = 2
"""Nothing was written: every input failed, or the arguments or the input were bad."""
EXIT_INCOMPLETE = 3
"""Every input was processed, but some acquisition was incomplete and its partial part was dropped and reported
(``convert``: a 4D series whose last time point lacks slices, as dcm2niix does)."""

EXIT_CODES_HELP = (
    "exit status: 0 every input done (or already done with --resume); 1 some inputs failed, the others written; "
    "2 nothing written (every input failed, or bad arguments / input); 3 every input done, but an incomplete "
    "acquisition was dropped in part (convert)"
)


def batch_exit_code(done: int, failed: int, *, incomplete: bool = False) -> int:
    """Exit code of a batch that processed ``done`` inputs and failed on ``failed`` (see the table above)."""
    if failed and not done:
        return EXIT_NOTHING_DONE
    if failed:
        return EXIT_SOME_FAILED
    return EXIT_INCOMPLETE if incomplete else EXIT_OK
