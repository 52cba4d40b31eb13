"""CIFAR-100 files in the official format (Python 2 pickles), small, for the tests."""

from __future__ import annotations

import pickle
import struct

import numpy as np


class Py2Pickler(pickle._Pickler):
    """Writes byte and text strings the way Python 2's cPickle wrote `str` (BINSTRING opcodes).

    The official CIFAR files were written by Python 2 at protocol 2: their keys,
    names and the numpy array's raw data are all Python 2 strings.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def write_py2_pickle(path, obj) -> None:
    import io

    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    # The originals were written by numpy 1.x, which lives at numpy.core, not numpy._core.
    path.write_bytes(buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))


def make_cifar(root, n_train=200, n_test=100, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    written = {}
    for part, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, size=n)]
        write_py2_pickle(
            folder / part,
            {
                b"filenames": [f"img_{i}.png".encode() for i in range(n)],
                b"batch_label": f"{part} batch".encode(),
                b"fine_labels": fine,
                b"coarse_labels": [v // 5 for v in fine],
                b"data": data,
            },
        )
        written[part] = (data, fine)
    names = [f"class_{i:02d}" for i in range(100)]
    write_py2_pickle(
        folder / "meta",
        {b"fine_label_names": [n.encode() for n in names], b"coarse_label_names": [b"c%d" % i for i in range(20)]},
    )
    return written, names
