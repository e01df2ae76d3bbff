"""Checking that every listed image exists: one stat per file against one listing per folder, side by side.

Builds ``--folders`` x ``--per-folder`` empty files in a temporary folder (an ImageNet-like layout, scaled down), then
times ``Path.is_file`` on every path (the check before) and :func:`missing_files` (one ``os.scandir`` per folder)
alternately, ``--repeats`` times each, and prints the medians and their ratio. On a network filesystem the gap is
larger than on a local disk: each stat is a round trip there.

    python benchmarks/file_check_cost.py --folders 200 --per-folder 500
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from lightning_transfer.datamodules.files import missing_files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folders", type=int, default=200)
    parser.add_argument("--per-folder", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        paths = []
        for f in range(args.folders):
            folder = Path(root) / f"n{f:08d}"
            folder.mkdir()
            for i in range(args.per_folder):
                (folder / f"{i}.JPEG").touch()
                paths.append(str(folder / f"{i}.JPEG"))
        stat_times, list_times = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            stat_missing = [p for p in paths if not Path(p).is_file()]
            stat_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            listed_missing = missing_files(paths)
            list_times.append(time.perf_counter() - start)
            assert stat_missing == listed_missing == []
    stat, listed = statistics.median(stat_times), statistics.median(list_times)
    print(f"{len(paths):,} files in {args.folders} folders, median of {args.repeats} (local disk, warm cache)")
    print(f"a stat per file:     {stat * 1000:8.1f} ms")
    print(f"a listing per folder:{listed * 1000:8.1f} ms")
    print(f"ratio (stat / listing): {stat / listed:.1f}x")


if __name__ == "__main__":
    main()
