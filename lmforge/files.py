"""Reading and writing lmforge's files so that what goes wrong is something people can act on:
a damaged file or a full disk is named as such, and weights get the permissions any other new
file gets."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

from lmforge.allocator import files_mapped
from lmforge.errors import CorruptFile, DiskFull

if TYPE_CHECKING:
    import torch


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                     metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, leaving the file with the mode the umask gives new files.

    safetensors writes a private temporary file (mode 0600) and renames it into place, so
    without this the weights would be the one file of a model others cannot read.
    """
    # Imported here, as torch comes with it: configs read JSON through this module too, and
    # `lmforge --help` should not wait for torch.
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    umask = os.umask(0)  # the only way to read it is to set it; put it straight back
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a truncated or damaged one is a `CorruptFile`."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except SafetensorError as err:
        raise CorruptFile(f"{path} is not a readable safetensors file ({err}): it is probably "
                          "truncated or damaged; save or download it again") from err
    files_mapped()  # its tensors are the file's pages (see `page_out`)
    return tensors


def read_json_object(path: str | Path) -> dict[str, Any]:
    """The JSON object in a file; anything else (cut-short text, a list) is a `CorruptFile`."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CorruptFile(f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column "
                          f"{err.colno}): the file is damaged or was cut short; fix it or write "
                          "it again") from err
    except UnicodeDecodeError as err:
        raise CorruptFile(f"{path} is not UTF-8 text, so not a JSON file ({err.reason} at byte "
                          f"{err.start}); write it again") from err
    if not isinstance(value, dict):
        raise CorruptFile(f"{path} holds a JSON {type(value).__name__}, where lmforge expects an "
                          "object of keys and values; write it again")
    return value


@contextmanager
def disk_full_reported(directory: str | Path, writing: str, advice: str) -> Iterator[None]:
    """Turn a write that ran out of space into a `DiskFull` saying where, what and what to do."""
    try:
        yield
    except Exception as err:
        if not _no_space(err):
            raise
        raise DiskFull(f"no space left on device while writing {writing} in {directory}: "
                       f"{advice}") from err


def _no_space(err: BaseException | None) -> bool:
    """Whether a write failed for want of disk space. Libraries wrap the OS error: torch.save
    (given a file object) keeps it as the context of its own, while safetensors and tokenizers
    report it only in the text, the way Rust prints it."""
    while err is not None:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        if f"(os error {errno.ENOSPC})" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False
