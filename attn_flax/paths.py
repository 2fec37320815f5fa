"""Paths the user gives (workdirs, data directories, outputs): local folders or ``gs://`` URIs alike.

Every file the project reads or writes goes through ``etils.epath``, the path library Orbax and TFDS use: a local
path is a ``pathlib`` path, ``gs://BUCKET/...`` goes to Google Cloud Storage through TensorFlow's file system.
``os.path``, ``open`` and ``os.rename`` would treat ``gs://b/run`` as a relative local path and write into a
folder named ``gs:``; :func:`resolve` is the one place a user's path becomes a path object.
"""
import os
from typing import Union

from etils import epath

PathLike = Union[str, os.PathLike]


def is_uri(path: PathLike) -> bool:
    """Whether ``path`` names remote storage (``gs://...``, ``s3://...``) rather than a local file."""
    return "://" in os.fspath(path)


def resolve(path: PathLike) -> epath.Path:
    """``path`` as an ``epath.Path``: a local one made absolute (as ``os.path.abspath`` would), a URI kept as
    given (``os.path.abspath`` and ``epath.Path.absolute`` would turn ``gs://b/x`` into ``<cwd>/gs:/b/x``)."""
    if is_uri(path):
        return epath.Path(path)
    return epath.Path(os.path.abspath(path))
