"""The model card (README.md) of a recipe's output: written from local facts only (no network calls)."""
from __future__ import annotations

from model_merging_methods.registry import get_method
from utils.cards import fenced, front_matter

from .schema import ModelRef, Recipe


def model_card(recipe: Recipe, recipe_text: str, output_name: str, version: str,
               revisions: dict[str, str | None]) -> str:
    """Front matter (hub base models, tags), the method and its paper, the inputs with revisions, the
    library version, how to load the model, and the recipe verbatim."""
    method = get_method(recipe.merge_method)
    refs = recipe.referenced_models()
    lines = front_matter([ModelRef.parse(r).path for r in refs], ["mergelm", "merge"])
    lines += [f"# {output_name}", "",
              f"This model was merged with mergelm {version} from a mergekit-compatible recipe.", "",
              "## Merge method", ""]
    paper = f"[{method.paper}]({method.url})" if method.url else method.paper
    base = ModelRef.parse(recipe.base_model) if recipe.base_model else None
    using = f", with {base} as the base" if base is not None and method.base in ("required", "optional") else ""
    lines += [f"**{method.pretty_name}** (`{method.name}`, mergekit semantics): {paper}{using}.", "",
              "## Input models", ""]
    for ref in refs:
        parsed = ModelRef.parse(ref)
        revision = parsed.revision or revisions.get(ref)
        role = " (base)" if ref == recipe.base_model else ""
        lines.append(f"- {parsed.path}{role}" + (f" @ revision `{revision}`" if revision else ""))
    lines += ["", "## How to load", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "", f'model = AutoModelForCausalLM.from_pretrained("{output_name}")',
              f'tokenizer = AutoTokenizer.from_pretrained("{output_name}")', "```", "",
              "## Recipe", "", *fenced(recipe_text, "yaml"),
              "The run's resolved settings, inputs and library versions are in `merge_manifest.json`.", ""]
    return "\n".join(lines)
