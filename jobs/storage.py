"""Where prepared data and runs live: a local folder, or any URI a pyarrow filesystem opens.

    resolve("data/coco-prepared")          LocalFileSystem, "/abs/data/coco-prepared"
    resolve("file:///shared/coco")         LocalFileSystem, "/shared/coco" (a folder every node mounts)
    resolve("s3://bucket/coco-prepared")   S3FileSystem, "bucket/coco-prepared"   (gs://, hdfs://, abfs:// alike)
    resolve(Location(SubTreeFileSystem(...), "x"))   any pyarrow filesystem object, handed over as it is

The one place a path or URI becomes (filesystem, path): the prepared-data readers (jobs/shards.py,
jobs/eval_set.py, the Ray Data reads of jobs/dataset.py) and the run storage of jobs/train.py and
jobs/sweep.py go through it. Credentials are never passed here: on a cluster pyarrow finds them in the
node's own environment (AWS_* variables or the instance role for S3, GOOGLE_APPLICATION_CREDENTIALS or the
metadata server for GCS), and every node that reads the data resolves them itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs

SCHEMES_HINT = "a local path, file://, s3://, gs:// (or another URI pyarrow.fs.FileSystem.from_uri opens)"


class StorageError(ValueError):
    """A path or URI no pyarrow filesystem can open (unknown scheme, missing driver, bad bucket name)."""


@dataclass(frozen=True)
class Location:
    """A folder or file on a pyarrow filesystem; picklable, so Ray tasks on other nodes open it too."""

    fs: pyarrow.fs.FileSystem
    path: str  # inside `fs`: "/abs/dir" locally, "bucket/prefix" on an object store
    uri: str = ""  # how a person names it (messages, MLflow params); defaults to the path

    def __post_init__(self) -> None:
        if not self.uri:
            object.__setattr__(self, "uri", self.path)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pyarrow.fs.LocalFileSystem)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def __truediv__(self, name: str) -> Location:
        return Location(self.fs, _join(self.path, name), _join(self.uri, name))

    def __str__(self) -> str:
        return self.uri

    def _type(self) -> pyarrow.fs.FileType:
        try:
            return self.fs.get_file_info(self.path).type
        except OSError as exc:  # e.g. an object store refusing access: the caller names the location
            raise StorageError(f"cannot open {self.uri}: {_first_line(exc)}") from None

    def is_dir(self) -> bool:
        return self._type() == pyarrow.fs.FileType.Directory

    def is_file(self) -> bool:
        return self._type() == pyarrow.fs.FileType.File

    def listing(self) -> dict[str, pyarrow.fs.FileType]:
        """Name -> type of what is directly inside this folder: one listing call, also on an object store."""
        try:
            infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self.path, allow_not_found=True))
        except OSError as exc:
            raise StorageError(f"cannot list {self.uri}: {_first_line(exc)}") from None
        return {info.base_name: info.type for info in infos}

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def write_bytes(self, data: bytes) -> None:
        """Write a whole file (an object on an object store), creating parent folders where they exist."""
        self.fs.create_dir(self.path.rstrip("/").rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)


Where = str | Path | Location  # what every reader and writer of data or runs accepts


def resolve(where: Where) -> Location:
    """The filesystem and path of a local path, a URI or an existing Location (StorageError for a URI that no
    pyarrow filesystem opens). Local paths become absolute: Ray workers run in other folders."""
    if isinstance(where, Location):
        return where
    text = str(where)
    if "://" not in text:
        local = str(Path(text).expanduser().resolve())
        return Location(pyarrow.fs.LocalFileSystem(), local, local)
    try:
        fs, path = pyarrow.fs.FileSystem.from_uri(text)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError, OSError) as exc:
        raise StorageError(f"cannot open {text!r}: {_first_line(exc)}; use {SCHEMES_HINT}") from None
    if not path.strip("/") and not isinstance(fs, pyarrow.fs.LocalFileSystem):
        raise StorageError(f"{text!r} names no bucket or folder; use e.g. s3://bucket/prefix")
    return Location(fs, path, text.rstrip("/"))


def storage_uri(where: str | Path) -> str:
    """Run storage as Ray Train and Tune take it: an absolute local path, or the URI once checked to open."""
    return resolve(where).uri


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if base else name


def _first_line(exc: BaseException) -> str:
    # pyarrow's messages can run to pages (hdfs:// lists every JVM path it tried)
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
