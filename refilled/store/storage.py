"""Where experiments live: a folder, or a URI that pyarrow understands (s3://,
gs://, hdfs://, file://...).

Ray Tune writes trials to either by itself. Our own files (experiment.yaml,
teacher.pt, optuna.db, trials.csv, ...) are made in a local mirror of a URI
experiment and copied up and down with these functions. The mirror of a URI
always has the same path on a machine (under $TUNE_REFILLED_CACHE, default
~/.cache/tune-refilled), so a resumed search finds its Optuna study where the
first run left it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

import pyarrow
import pyarrow.fs as pafs

from refilled.errors import UserError, shown
from refilled.files.atomic import write_atomic
from refilled.store.paths import experiment_name, probe, real, refuse_repository

CACHE_ENV = "TUNE_REFILLED_CACHE"
ERRORS = (OSError, pyarrow.ArrowException)  # what a storage may raise when it cannot be reached or written


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(uri)
    except (*ERRORS, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{uri}: pyarrow cannot open this storage ({reason}): check the scheme "
                        "(s3://, gs://, hdfs://, file://), the bucket and the credentials") from None


def filesystem_of(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """The storage of a folder or a URI, and the path there (a folder's made absolute)."""
    if is_uri(location):
        return filesystem(str(location))
    return pafs.LocalFileSystem(), str(Path(location).absolute())


def mirror(uri: str) -> Path:
    """The local folder that mirrors the URI experiment `uri` on this machine."""
    base = Path(os.environ.get(CACHE_ENV) or "~/.cache/tune-refilled").expanduser().resolve()
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    return base / "mirrors" / hashlib.sha1(uri.rstrip("/").encode()).hexdigest()[:12] / name


def list_files(uri: str) -> list[str]:
    """Paths (relative to `uri`, '/'-separated) of every file under it."""
    fs, root = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return sorted(i.path[len(root):].lstrip("/") for i in infos if i.type == pafs.FileType.File)


def exists(uri: str) -> bool:
    fs, root = filesystem(uri)
    return fs.get_file_info(root).type != pafs.FileType.NotFound


def download(uri: str, local: Path, skip: Callable[[str], bool] = lambda rel: False) -> list[str]:
    """Copy every file under `uri` (but those `skip` names) into `local`; returns their paths."""
    fs, root = filesystem(uri)
    copied = []
    for rel in list_files(uri):
        if skip(rel):
            continue
        target = local / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            pafs.copy_files(f"{root}/{rel}", str(target), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())
        except FileNotFoundError:
            # gone since the listing: a file another writer renamed into place (the lease's
            # heartbeat, Ray's state) or deleted; what it became was listed, or is not ours to copy
            if fs.get_file_info(f"{root}/{rel}").type != pafs.FileType.NotFound:
                raise
            continue
        copied.append(rel)
    return copied


def download_file(uri: str, target: Path) -> None:
    fs, path = filesystem(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


def upload(local: Path, uri: str, names: Iterable[str]) -> None:
    """Copy the files or folders `names` of `local` (those that exist) to the same places under `uri`."""
    fs, root = filesystem(uri)
    for name in names:
        source = local / name
        if not source.exists():
            continue
        target = f"{root}/{name}"
        if source.is_dir():
            fs.create_dir(target, recursive=True)
        else:
            fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(str(source), target, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def move(uri: str, source: str, target: str) -> None:
    """Move the folder `source` under `uri` to `target` (object stores copy, then delete)."""
    fs, root = filesystem(uri)
    fs.create_dir(f"{root}/{target}".rsplit("/", 1)[0], recursive=True)
    try:
        fs.move(f"{root}/{source}", f"{root}/{target}")
    except ERRORS:
        pafs.copy_files(f"{root}/{source}", f"{root}/{target}", source_filesystem=fs, destination_filesystem=fs)
        fs.delete_dir(f"{root}/{source}")


def remove(uri: str, keep: Iterable[str] = ()) -> None:
    """Delete everything under `uri` but the entries named in `keep`."""
    fs, root = filesystem(uri)
    keep = tuple(keep)
    temporaries = tuple(f"{k}." for k in keep)  # a kept file's own (the lease's heartbeat writes driver.lease.<hex>.tmp)
    for entry in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if entry.base_name in keep or entry.base_name.startswith(temporaries):
            continue
        if entry.type == pafs.FileType.Directory:
            fs.delete_dir(entry.path)
        else:
            fs.delete_file(entry.path)


def remove_if_empty(uri: str) -> None:
    """Delete the folder at `uri` if it holds nothing (a file system's; an object store has none)."""
    fs, root = filesystem(uri)
    if fs.get_file_info(root).type == pafs.FileType.Directory and \
            not fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        fs.delete_dir(root)


def is_checkpoint(rel: str) -> bool:
    """Ray Tune's trial checkpoints: large, and not needed to read results."""
    return any(part.startswith("checkpoint_") for part in rel.split("/"))


@dataclass(frozen=True)
class Place:
    """Where an experiment is: a folder, or a URI and the local mirror our files are made in."""
    folder: Path
    uri: str | None = None

    @property
    def location(self) -> str:
        return self.uri or str(self.folder)

    @property
    def storage_path(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[0] if self.uri else str(self.folder.parent)

    @property
    def name(self) -> str:
        """Its folder's name in storage_path: the experiment's name (or its part's, stage1_search)."""
        return self.location.rstrip("/").rsplit("/", 1)[-1]

    def exists(self, ignore: Callable[[str], bool] = lambda name: False) -> bool:
        """Whether anything is there but entries whose names `ignore` accepts."""
        if self.uri:
            fs, root = filesystem(self.uri)
            entries = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
            return any(not ignore(e.base_name) for e in entries)
        return self.folder.is_dir() and any(not ignore(p.name) for p in self.folder.iterdir())

    def pull(self, skip: Callable[[str], bool] = is_checkpoint) -> None:
        """A fresh mirror of the URI experiment (Ray's checkpoints stay in storage)."""
        if self.uri:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.mkdir(parents=True)
            download(self.uri, self.folder, skip=skip)

    def push(self, *names: str) -> None:
        """Copy files the folder already holds (written by another library) up to the URI."""
        if self.uri:
            upload(self.folder, self.uri, names)

    def write(self, name: str, content: bytes | str | Callable[[BinaryIO], object]) -> Path:
        """Write the file `name` (a path inside the experiment) atomically, and keep it at the URI too."""
        path = write_atomic(self.folder / name, content)
        self.push(name)
        return path

    @classmethod
    def named(cls, storage: str, name: str) -> Place:
        """The experiment `name` in the storage `storage` (a folder or a URI), as `--storage`
        and `--name` give it; a file where a folder belongs is refused in one line."""
        experiment_name(name)  # one folder name: never a path that leaves --storage
        if is_uri(storage):
            uri = join(storage, name)
            filesystem(uri)  # refuses a URI pyarrow cannot open, in one line
            return cls(mirror(uri), uri)
        probe(Path(storage) / name)  # a symlink loop, a name too long: said now, not once Ray has started
        folder = real(storage)
        if folder.exists() and not folder.is_dir():
            raise UserError(f"--storage {shown(storage)} is a file, not a folder: name a folder (made if missing) or a URI")
        refuse_repository(folder / name, "--storage/--name", folder / name)
        if (folder / name).exists() and not (folder / name).is_dir():
            raise UserError(f"{shown(folder / name)} is a file, not an experiment folder: choose another --name "
                            "(or --storage)")
        return cls(folder / name)

    @classmethod
    def at(cls, location: str, sub: str = "") -> Place:
        """The experiment at `location` (a folder or a URI, as Place.location gives it), or its
        part `sub` (a staged search's stage1_search); nothing is read. The mirror of a URI is
        this machine's: what a resumed driver, perhaps elsewhere, must use."""
        uri = location.rstrip("/") if is_uri(location) else None
        place = cls(mirror(uri), uri) if uri else cls(Path(location))
        return place.part(sub) if sub else place

    @classmethod
    def mirrored(cls, location: str | Path) -> Place:
        """The experiment at a folder or a URI, to read: a URI is mirrored first (its results
        and teacher; not Ray's checkpoints, not the teacher bank)."""
        if not is_uri(location):
            return cls(real(location))
        uri = str(location).rstrip("/")
        filesystem(uri)
        place = cls(mirror(uri), uri)
        place.pull(skip=lambda rel: is_checkpoint(rel) or rel.startswith("bank-"))
        return place

    def part(self, name: str) -> "Place":
        """The folder `name` inside this experiment, as a place of its own (a staged search's phase 1)."""
        return Place(self.folder / name, join(self.uri, name) if self.uri else None)
