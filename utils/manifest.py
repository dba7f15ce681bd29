"""The one manifest every run that writes a model or an analysis leaves beside its output.

Merges from flags, recipes and --from_manifest (merge_manifest.json), MoE builds (merge_manifest.json),
task-vector analyses (analysis.json), LoRA extraction (extract_lora.json) and LoRA merges (merge_lora.json)
all start from run_manifest: the tool, the manifest version, the time (ISO 8601 UTC), the project's version
and git commit, the library versions, and every input with its identity (the source as given, its absolute
folder, the hub repo and revision when the folder is a hub snapshot) and the sha256 of each of its files,
then the run's own fields and its wall time. File hashes are what `sha256sum` prints; they are computed on
one thread beside the run's own work (hash_beside) and remembered by stat key in a bounded cache.

A model folder copies only what it needs from its donor (MODEL_FILE_PATTERNS: config, generation config,
tokenizer, chat template, processor configs, custom code): never an input's own records (its manifest, a
conversion.json, a model card), which describe the input, not the output.

Free of torch, so that the command lines' early checks stay fast.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, TypeVar

from utils.records import library_versions, project_provenance, write_json_atomic

MANIFEST_VERSION = 3
# what a model folder needs besides its weights: config, generation config, tokenizer files, chat template,
# processor configs, and the custom code a config's auto_map names; anything else is listed, not copied
MODEL_FILE_PATTERNS = ("config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
                       "added_tokens.json", "vocab.*", "merges.txt", "*.model", "chat_template.*",
                       "preprocessor_config.json", "processor_config.json", "configuration_*.py",
                       "modeling_*.py", "tokenization_*.py")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
HASH_CACHE_ENV = "MERGELM_HASH_CACHE"
HASH_CACHE_ENTRIES = 4096   # at most this many files remembered (~1 MB), the least recently used dropped first
_HUB_BLOB = re.compile(r"^[0-9a-f]{64}$")
_HUB_SNAPSHOT = re.compile(r"^(models|datasets|spaces)--(.+)$")
T = TypeVar("T")


def run_manifest(tool: str, started: float, inputs: list[dict], **fields) -> dict:
    """The fields every manifest begins with, then `fields` (the run's own), then wall_seconds (from
    `started`, a time.time())."""
    return {"tool": tool, "manifest_version": MANIFEST_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "project": project_provenance(),
            "versions": library_versions(), "inputs": inputs, **fields,
            "wall_seconds": round(time.time() - started, 3)}


def input_record(role: str, source: str, folder: str | os.PathLike, files: Iterable[Path],
                 digests: dict[Path, str], **extra) -> dict:
    """One input: its role, the source as given (a path or a hub id), its absolute folder, the hub repo and
    revision when that folder is a hub snapshot, and name, size and sha256 of each of its `files`."""
    folder = Path(folder).expanduser().resolve()
    return {"role": role, "source": str(source), "path": str(folder), **hub_identity(folder),
            "files": [{"file": path.name, "bytes": path.stat().st_size, "sha256": digests[path]} for path in files],
            **extra}


def hub_identity(folder: Path) -> dict:
    """{"hub_repo", "hub_revision"} of a Hugging Face cache snapshot (…/models--org--name/snapshots/<commit>),
    else {}."""
    found = _HUB_SNAPSHOT.match(folder.parent.parent.name) if folder.parent.name == "snapshots" else None
    return {"hub_repo": found.group(2).replace("--", "/"), "hub_revision": folder.name} if found else {}


def copy_model_files(donor: Path, staging: Path, skip: Iterable[str] = ()) -> dict:
    """Copy what a model folder needs (MODEL_FILE_PATTERNS) from `donor` into `staging`, except names in
    `skip` and names the staging folder already has. Returns the donor, the files copied and those left out
    (weights are neither copied nor listed)."""
    skip = set(skip)
    copied, left_out = [], []
    for path in sorted(donor.iterdir()):
        if path.name in skip or (staging / path.name).exists():
            continue
        if path.is_file() and any(fnmatch.fnmatch(path.name, pattern) for pattern in MODEL_FILE_PATTERNS):
            shutil.copyfile(path, staging / path.name)
            copied.append(path.name)
        elif not path.name.endswith(WEIGHT_SUFFIXES + (".index.json",)):
            left_out.append(path.name + ("/" if path.is_dir() else ""))
    return {"from": str(donor), "copied": copied, "not_copied": left_out}


# ---- file hashes --------------------------------------------------------------------------------------------

def file_sha256(path: Path, chunk: int = 8 * 2**20, stop: threading.Event | None = None) -> str | None:
    """sha256 of a file's bytes (what ``sha256sum`` prints, and the hub's LFS oid of a weight file); None
    when `stop` is set meanwhile. hashlib releases the GIL on large buffers, so this runs beside the
    run's worker threads."""
    digest = hashlib.sha256()
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            if stop is not None and stop.is_set():
                return None
            digest.update(view[:count])
    return digest.hexdigest()


def hash_beside(paths: Iterable[Path], work: Callable[[], T]) -> tuple[T, dict[Path, str]]:
    """Run `work` while one thread computes the sha256 of every file of `paths` not already known
    (known_sha256: hub blobs, earlier runs); returns work's result and every file's digest. sha256 costs
    ~0.6 s of CPU per GB: on a machine with a free core it hides behind the work, and runs over the same
    inputs pay it once. An interrupted or failed `work` does not wait for the hashes."""
    paths = list(dict.fromkeys(paths))
    cache = _read_cache()     # read once, not once per shard
    known = {path: known_sha256(path, cache) for path in paths}
    stop = threading.Event()
    with ThreadPoolExecutor(1) as hasher:
        futures = {path: hasher.submit(file_sha256, path, stop=stop) for path, digest in known.items()
                   if digest is None}
        try:
            result = work()
        except BaseException:
            stop.set()
            raise
        computed = {path: future.result() for path, future in futures.items()}
    digests = {**known, **computed}
    remember_sha256(digests)
    return result, digests


def hash_cache_path() -> Path:
    """Where known file hashes are kept: $MERGELM_HASH_CACHE, else <user cache>/mergelm/file_sha256.json."""
    configured = os.environ.get(HASH_CACHE_ENV)
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mergelm" / "file_sha256.json"


def _stat_key(path: Path) -> list[int]:
    """What changes whenever the content can have changed: size, inode, device, mtime and ctime (ctime
    cannot be set back by users, so a rewritten file never matches its old entry)."""
    info = path.stat()
    return [info.st_size, info.st_ino, info.st_dev, info.st_mtime_ns, info.st_ctime_ns]


def _read_cache() -> dict:
    try:
        known = json.loads(hash_cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def known_sha256(path: Path, cache: dict | None = None) -> str | None:
    """The file's sha256 without reading it, when known: a Hugging Face cache blob is named by the sha256
    of its content (LFS files), and files hashed before are remembered by their stat key (hash_cache_path;
    `cache`: its content, already read)."""
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs" and _HUB_BLOB.match(real.name):
        return real.name
    entry = (_read_cache() if cache is None else cache).get(str(real))
    if isinstance(entry, dict) and entry.get("stat") == _stat_key(real):
        return entry.get("sha256")
    return None


def remember_sha256(digests: dict[Path, str]) -> None:
    """Record these files' hashes as used now, and bound the cache: entries whose file is gone or changed
    are dropped, then all but the HASH_CACHE_ENTRIES most recently used. Best effort: an unwritable cache
    only costs time. Hub blobs are not stored (their name is their hash)."""
    try:
        known = _read_cache()
        now = time.time()
        for path, digest in digests.items():
            real = Path(os.path.realpath(path))
            if not (real.parent.name == "blobs" and _HUB_BLOB.match(real.name)):
                known[str(real)] = {"stat": _stat_key(real), "sha256": digest, "used": now}
        kept = {}
        for name, entry in known.items():
            try:
                if isinstance(entry, dict) and entry.get("stat") == _stat_key(Path(name)):
                    kept[name] = entry
            except OSError:
                continue
        newest = sorted(kept.items(), key=lambda item: -float(item[1].get("used", 0)))[:HASH_CACHE_ENTRIES]
        write_json_atomic(hash_cache_path(), dict(newest))
    except (OSError, ValueError, TypeError):
        pass
