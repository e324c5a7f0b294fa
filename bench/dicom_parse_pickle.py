"""What parsing DICOM headers in worker processes would cost to send back: parse time vs pickling the datasets.

    .venv/bin/python bench/dicom_parse_pickle.py --slices 200

Writes the real-header series of ``bench/convert.py --real-header`` (512², pydicom's CT_small header) to a temporary
folder, parses every file as discovery does (``medfusion.io.dicom.header._read_header`` under ``quiet_reading``), then
pickles and unpickles the parsed datasets: if returning them costs as much as parsing, a worker pool must return
only the frame facts and pixel offsets (bench/results/convert.md).
"""

from __future__ import annotations

import argparse
import pickle
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slices", type=int, default=200)
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from convert import make_series_real_header

    from medfusion.io.dicom.header import _read_header, quiet_reading

    with tempfile.TemporaryDirectory() as tmp:
        make_series_real_header(Path(tmp), args.slices, 512)
        files = sorted(Path(tmp).iterdir())
        with quiet_reading():
            t0 = time.perf_counter()
            datasets = [_read_header(f)[0] for f in files]
            parse = time.perf_counter() - t0
        t0 = time.perf_counter()
        blobs = [pickle.dumps(d, protocol=5) for d in datasets]
        dump = time.perf_counter() - t0
        t0 = time.perf_counter()
        for b in blobs:
            pickle.loads(b)
        load = time.perf_counter() - t0
    print(f"{len(files)} files: parse {parse:.3f} s; pickle {dump:.3f} s + unpickle {load:.3f} s "
          f"({sum(map(len, blobs)) / len(blobs):.0f} bytes per file)")  # fmt: skip


if __name__ == "__main__":
    main()
