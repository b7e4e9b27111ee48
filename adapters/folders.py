"""Reading a client-named adapter folder safely: inside the allow-list, no symlinks, size-capped.

A source is a local folder (or a file:// URI) or an fsspec URI (s3://, gs://, hf://, memory://, ...;
the protocol's fsspec package must be installed, e.g. s3fs for s3://). The allow-list
(`adapter_load_dirs`) holds local directories and URI prefixes; a URI is inside a prefix of the
same protocol when its path equals the prefix's or continues it after a "/", and no URI path may
contain a ".." segment.

The store runs this (the same process that reads the files), so the check and the read see the
same file system: a local folder is resolved once and opened as a directory, and each file is
opened relative to it with O_NOFOLLOW, so a symlinked file (or one swapped for a symlink after the
check) cannot lead outside the allowed directories.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable

from vlora.adapters.peft_io import AdapterFormatError


class AdapterPathError(ValueError):
    """The folder is outside the allowed directories, or a file in it is not a plain regular file."""


class AdapterSourceNotFoundError(AdapterFormatError):
    """The named folder (or URI) does not exist (404, as vLLM answers)."""


def split_uri(source: str) -> tuple[str | None, str]:
    """(protocol, path) of an fsspec URI; (None, local path) for a plain path or a file:// URI."""
    if "://" not in source:
        return None, source
    protocol, path = source.split("://", 1)
    protocol = protocol.lower()
    if protocol in ("file", "local"):
        return None, path
    return protocol, path.rstrip("/")


def is_remote(source: str) -> bool:
    return split_uri(source)[0] is not None


def _uri_allowed(protocol: str, path: str, allowed: list[str]) -> bool:
    for entry in allowed:
        p, prefix = split_uri(entry)
        if p == protocol and (path == prefix or path.startswith(prefix + "/")):
            return True
    return False


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def resolve_folder(folder: str, allowed_dirs: Iterable[str] | None) -> str:
    """The folder's real path, if it lies inside one of `allowed_dirs` (None: no allow-list)."""
    if not isinstance(folder, str) or not folder:
        raise AdapterPathError("path must be a non-empty string naming a PEFT adapter folder")
    real = os.path.realpath(split_uri(folder)[1])
    if allowed_dirs is not None:
        allowed = list(allowed_dirs)
        local = [split_uri(d)[1] for d in allowed if not is_remote(d)]
        if not any(_inside(real, os.path.realpath(d)) for d in local):
            raise AdapterPathError(f"path {folder!r} is outside the directories adapters may be loaded from "
                                   f"(adapter_load_dirs: {allowed})")
    return real


def read_files(folder: str, names: Iterable[str], max_bytes: int,
               allowed_dirs: Iterable[str] | None = None) -> dict[str, bytes | None]:
    """{name: bytes, or None if absent} for files directly in `folder` (a local folder or an fsspec
    URI); each must be a regular file (not a symlink) of at most `max_bytes`."""
    if is_remote(folder):
        return _read_remote(folder, names, max_bytes, allowed_dirs)
    real = resolve_folder(folder, allowed_dirs)
    try:
        dir_fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise AdapterSourceNotFoundError(f"{folder} does not exist: name a PEFT adapter folder") from None
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


def _read_remote(uri: str, names: Iterable[str], max_bytes: int,
                 allowed_dirs: Iterable[str] | None) -> dict[str, bytes | None]:
    """read_files over fsspec: the URI must lie under an allowed URI prefix."""
    protocol, path = split_uri(uri)
    if ".." in path.split("/"):
        raise AdapterPathError(f"path {uri!r} may not contain '..' segments")
    if allowed_dirs is not None and not _uri_allowed(protocol, path, list(allowed_dirs)):
        raise AdapterPathError(f"path {uri!r} is outside the locations adapters may be loaded from "
                               f"(adapter_load_dirs: {list(allowed_dirs)})")
    try:
        import fsspec

        fs = fsspec.filesystem(protocol)
    except (ImportError, ValueError) as e:
        raise AdapterPathError(f"cannot read {protocol}:// URIs here ({e}); install the fsspec package for "
                               f"{protocol} (e.g. s3fs, gcsfs) on the cluster") from None
    try:
        if not fs.isdir(path):
            if fs.exists(path):
                raise AdapterFormatError(f"{uri} is not a folder: name a PEFT adapter folder")
            raise AdapterSourceNotFoundError(f"{uri} does not exist: name a PEFT adapter folder")
        out: dict[str, bytes | None] = {}
        for name in names:
            fpath = f"{path}/{name}"
            if not fs.exists(fpath):
                out[name] = None
                continue
            size = fs.size(fpath)
            if size is not None and size > max_bytes:
                raise AdapterPathError(f"{name} is {size} bytes, above the limit of {max_bytes}")
            with fs.open(fpath, "rb") as f:
                data = f.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise AdapterPathError(f"{name} is more than {max_bytes} bytes, above the limit")
            out[name] = data
        return out
    except (AdapterFormatError, AdapterPathError):
        raise
    except OSError as e:  # permissions, network: say which URI and why, never a 500 without a cause
        raise AdapterPathError(f"cannot read {uri}: {e}") from None
