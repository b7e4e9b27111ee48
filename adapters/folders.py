"""Reading a client-named adapter folder safely: inside the allow-list, no symlinks, size-capped.

The store runs this (the same process that reads the files), so the check and the read see the
same file system: the folder is resolved once and opened as a directory, and each file is opened
relative to it with O_NOFOLLOW, so a symlinked file (or one swapped for a symlink after the
check) cannot lead outside the allowed directories.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable

from adapters.peft_io import AdapterFormatError


class AdapterPathError(ValueError):
    """The folder is outside the allowed directories, or a file in it is not a plain regular file."""


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def resolve_folder(folder: str, allowed_dirs: Iterable[str] | None) -> str:
    """The folder's real path, if it lies inside one of `allowed_dirs` (None: no allow-list)."""
    if not isinstance(folder, str) or not folder:
        raise AdapterPathError("path must be a non-empty string naming a PEFT adapter folder")
    real = os.path.realpath(folder)
    if allowed_dirs is not None:
        allowed = list(allowed_dirs)
        if not any(_inside(real, os.path.realpath(d)) for d in allowed):
            raise AdapterPathError(f"path {folder!r} is outside the directories adapters may be loaded from "
                                   f"(adapter_load_dirs: {allowed})")
    return real


def read_files(folder: str, names: Iterable[str], max_bytes: int,
               allowed_dirs: Iterable[str] | None = None) -> dict[str, bytes | None]:
    """{name: bytes, or None if absent} for files directly in `folder`; each must be a regular file
    (not a symlink) of at most `max_bytes`."""
    real = resolve_folder(folder, allowed_dirs)
    try:
        dir_fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise AdapterFormatError(f"{folder} does not exist: name a PEFT adapter folder") from None
    except NotADirectoryError:
        raise AdapterFormatError(f"{folder} is not a folder: name a PEFT adapter folder") from None
    try:
        return {name: _read_one(dir_fd, name, max_bytes) for name in names}
    finally:
        os.close(dir_fd)


def _read_one(dir_fd: int, name: str, max_bytes: int) -> bytes | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as e:  # ELOOP: the file is a symlink
        raise AdapterPathError(f"{name} cannot be opened ({e.strerror}); adapter files must be regular files, "
                               "not symlinks") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise AdapterPathError(f"{name} is not a regular file")
        if st.st_size > max_bytes:
            raise AdapterPathError(f"{name} is {st.st_size} bytes, above the limit of {max_bytes}")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise AdapterPathError(f"{name} is more than {max_bytes} bytes, above the limit")
    return data
