"""The mirror of a URI experiment (refilled.store.storage) while other writers change it:
the driver's lease heartbeat and Ray rename files into place as the mirror is copied."""

from __future__ import annotations

import errno
import os

import pyarrow.fs as pafs
import pytest

from refilled.errors import os_error_line
from refilled.store import storage


def test_a_file_renamed_away_between_listing_and_copy_is_left_out(tmp_path):
    """As the lease's heartbeat does (driver.lease.<hex>.tmp, then renamed onto driver.lease):
    the copy meets a listed file that is gone, which is no error."""
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    (bucket / "trials.csv").write_text("a,b\n")
    (bucket / "driver.lease.1a2b.tmp").write_text("{}")

    def rename_as_the_heartbeat_does(rel: str) -> bool:  # called once a file is listed, before its copy
        if rel.endswith(".tmp"):
            os.replace(bucket / rel, bucket / "driver.lease")
        return False

    copied = storage.download(f"file://{bucket}", tmp_path / "mirror", skip=rename_as_the_heartbeat_does)
    assert copied == ["trials.csv"]
    assert (tmp_path / "mirror" / "trials.csv").read_text() == "a,b\n"


def test_a_file_that_exists_but_cannot_be_read_is_still_an_error(tmp_path):
    if os.geteuid() == 0:  # root reads a file of mode 000: a folder in the file's place refuses anyone
        (tmp_path / "bucket" / "x").mkdir(parents=True)
        (tmp_path / "bucket" / "x" / "inner").write_text("1")
        (tmp_path / "mirror" / "x").mkdir(parents=True)
        (tmp_path / "mirror" / "x" / "inner").mkdir()  # a folder where the copy must write a file
    else:
        (tmp_path / "bucket").mkdir()
        (tmp_path / "bucket" / "x").write_text("1")
        (tmp_path / "bucket" / "x").chmod(0)
    with pytest.raises(OSError):
        storage.download(f"file://{tmp_path / 'bucket'}", tmp_path / "mirror")


def test_pyarrow_refusals_name_their_path_in_one_line(tmp_path):
    """pyarrow's OSError names no `filename`: the line takes the path from its message."""
    fs = pafs.LocalFileSystem()
    with pytest.raises(FileNotFoundError) as raised:
        pafs.copy_files(str(tmp_path / "gone"), str(tmp_path / "out"), source_filesystem=fs, destination_filesystem=fs)
    assert raised.value.errno == errno.ENOENT and raised.value.filename is None
    assert os_error_line(raised.value) == f"{tmp_path / 'gone'}: no such file or folder: check the path"
