r"""A CIFAR-10 copy whose first training images carry their true (lossless) pixels.

The CIFAR-10 copy that ``make data`` builds from ``../shared/data`` went through JPEG (quality
75) once, so a second JPEG pass changes its images less than it would change the official
ones. That matters to any defense that compares an image with its JPEG copy (``epic-plus``'s
``squeeze`` rank, the ``jpeg`` defense). The shared data also holds the first 4,000 training
images losslessly; this tool writes a copy of the built CIFAR-10 folder in which the first
``--count`` training images are those true pixels (labels checked equal), everything else
unchanged. ``configs/cpu-cifar10-transfer-lossless.yaml`` trains its victims on them.

    python tools/cifar10_lossless.py [--source .cache/cifar10] [--out .cache/cifar10-lossless] \
        [--count 2500]

``--count`` defaults to 2,500, the victims' training slice of the transfer configs, so that the
surrogate's slice (images 2,500-22,499) stays the JPEG copy's and the same surrogate serves
both configs. Writes atomically (a temporary folder renamed at the end).
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

SUBSET = "cifar10/cifar10-exact-subset.npz"


def overlay(source: Path, subset: Path, out: Path, count: int) -> None:
    """Copy ``source/cifar-10-batches-py`` to ``out`` with the first ``count`` training images
    replaced by ``subset``'s lossless ones."""
    batches = source / "cifar-10-batches-py"
    if not (batches / "data_batch_1").is_file():
        sys.exit(f"error: no CIFAR-10 copy in {batches}; build it with `make data` or pass "
                 "--source")
    if not subset.is_file():
        sys.exit(f"error: {subset} not found; pass --shared (the folder of ../shared/data)")
    exact = np.load(subset)
    x, y = exact["x_train"], exact["y_train"].astype(np.int64)
    if not 0 < count <= len(x):
        sys.exit(f"error: --count must be between 1 and {len(x)} (the lossless subset's size)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp"))
    try:
        shutil.copytree(batches, tmp / "cifar-10-batches-py")
        done = 0
        for k in range(1, 6):
            if done == count:
                break
            path = tmp / "cifar-10-batches-py" / f"data_batch_{k}"
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            key = b"data" if b"data" in batch else "data"
            labels = np.asarray(batch[b"labels" if b"labels" in batch else "labels"])
            n = min(len(labels), count - done)
            if not np.array_equal(labels[:n], y[done:done + n]):
                sys.exit(f"error: {batches} and {subset} disagree on the labels of the first "
                         "training images; rebuild the copy with `make data`")
            data = batch[key]
            data[:n] = x[done:done + n].transpose(0, 3, 1, 2).reshape(n, -1)
            with open(path, "wb") as f:
                pickle.dump(batch, f)
            done += n
        tmp.chmod(0o755)  # mkdtemp's folder is private; the copy it replaces was not
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out / 'cifar-10-batches-py'}: the first {count} training images lossless")


def main() -> None:
    cache = Path(os.environ.get("EPIC_CACHE", ".cache"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=cache / "cifar10",
                        help="the built CIFAR-10 copy (default: $EPIC_CACHE/cifar10)")
    parser.add_argument("--shared", type=Path,
                        default=Path(os.environ.get("EPIC_SHARED_DATA", "../shared/data")),
                        help="the shared data folder holding " + SUBSET)
    parser.add_argument("--out", type=Path, default=cache / "cifar10-lossless")
    parser.add_argument("--count", type=int, default=2500)
    args = parser.parse_args()
    overlay(args.source, args.shared / SUBSET, args.out, args.count)


if __name__ == "__main__":
    main()
