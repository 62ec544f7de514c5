"""Reader for the IDX format of MNIST and Fashion-MNIST, gzipped or not."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from edgekd.errors import EdgeKDError

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


FIX = "download it again (--download), or reinstall the package it came from"


def read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:  # gzip: BadGzipFile is an OSError; a cut-off stream ends in EOFError
        raise EdgeKDError(f"{path} cannot be read ({exc or type(exc).__name__}): {FIX}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise EdgeKDError(f"{path} is not an IDX file: {FIX}")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    itemsize = np.dtype(_DTYPES[data[2]]).itemsize
    expected = int(np.prod(shape))
    if len(data) != 4 + 4 * ndim + expected * itemsize:
        raise EdgeKDError(f"{path} is truncated or padded: its header promises {expected} values: {FIX}")
    return np.frombuffer(data, dtype=_DTYPES[data[2]], offset=4 + 4 * ndim).reshape(shape)


def find_idx(directory: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem, stem.replace("-idx", ".idx")):
        if (directory / name).is_file():
            return directory / name
    return None
