"""A bulk job's image cells as engine inputs: bytes and URLs as they are, files as checked readers.

An ``--image-column`` cell is raw bytes, a ``data:`` URI, an ``http(s)`` URL (all handed to the
engine as they are: ``worker.models.vision`` reads them), or a file: a local path (relative ones
to the corpus's folder) or an ``s3://`` URI. A file cell becomes a reader the engine calls on its
host pool, so a shard's images are read one at a time while earlier ones run, never all at once.
The reader refuses a file outside the worker's storage roots (``worker.hosting.trust``: a broker
message must not make a worker read ``/etc/...`` into a vector) and one over
``EMBEDFLEET_IMAGE_MAX_BYTES``; each refusal fails that row alone, with the reason.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import Any, Callable

from producer import storage
from producer.settings import settings
from worker.hosting.trust import StorageRoots
from worker.models.vision import ImageProblem

_AS_IS = ("data:", "http://", "https://")


def corpus_folder(source: str) -> str:
    """The folder relative image paths of a corpus count from."""
    if "://" in source and not source.startswith("file://"):
        return posixpath.dirname(source)
    return str(Path(source.removeprefix("file://")).expanduser().resolve().parent)


def image_cells(values: list[dict[str, Any]], source: str, roots: StorageRoots | None) -> list[dict[str, Any]]:
    """``{"image": cell}`` inputs with file cells replaced by their readers, which read inside
    ``roots`` only (the worker's; ``None`` checks nothing)."""
    folder = corpus_folder(source)
    return [{"image": cell_reader(value.get("image"), folder, roots)} for value in values]


def cell_reader(cell: Any, folder: str, roots: StorageRoots | None) -> Any:
    if not isinstance(cell, str) or cell.startswith(_AS_IS):
        return cell
    if "://" in cell and not cell.startswith("file://"):
        uri = cell
    else:
        local = cell.removeprefix("file://")
        uri = local if os.path.isabs(local) else (posixpath.join(folder, local) if "://" in folder
                                                 else str(Path(folder) / local))
    return _reader(uri, roots)


def _reader(uri: str, roots: StorageRoots | None) -> Callable[[], bytes]:
    def read() -> bytes:
        reason = roots.refusal(uri) if roots is not None else None
        if reason:
            raise ImageProblem(f"image {reason}")
        limit = settings().image_max_bytes
        if "://" not in uri and os.path.isfile(uri) and os.path.getsize(uri) > limit:
            raise ImageProblem(f"{uri!r} is over the limit of {limit} bytes (EMBEDFLEET_IMAGE_MAX_BYTES)")
        try:
            return storage.read_bytes(storage.locate(uri))
        except FileNotFoundError:
            raise ImageProblem(f"no image file at {uri!r}") from None
        except OSError as exc:
            raise ImageProblem(f"cannot read {uri!r}: {type(exc).__name__}: {exc}") from None

    return read
