"""Pieces shared by the model cards (README.md) that merge outputs carry: the Hugging Face front matter and
fenced blocks. Cards are written from local facts only: no network calls (a hub id is recognised by its
shape, never looked up)."""
from __future__ import annotations

from pathlib import Path


def hub_ids(sources: list[str]) -> list[str]:
    """The sources that look like hub ids (`owner/name`, not an existing local path), in order, once each."""
    def is_hub_id(source: str) -> bool:
        return (not Path(source).expanduser().exists() and source.count("/") == 1
                and not source.startswith((".", "/", "~")))

    return list(dict.fromkeys(s for s in sources if is_hub_id(s)))


def front_matter(sources: list[str], tags: list[str]) -> list[str]:
    """The YAML front matter: `base_model` (the hub ids among the sources), library and tags."""
    hub = hub_ids(sources)
    lines = ["---"] + (["base_model:"] + [f"- {h}" for h in hub] if hub else [])
    return lines + ["library_name: transformers", "tags:"] + [f"- {tag}" for tag in tags] + ["---", ""]


def fenced(text: str, language: str) -> list[str]:
    """A verbatim block (a recipe or config as the user wrote it)."""
    return [f"```{language}", text.rstrip("\n"), "```", ""]
