"""The model card (README.md) of a recipe's output: written from local facts only (no network calls)."""
from __future__ import annotations

from pathlib import Path

from model_merging_methods.recipe_registry import get_recipe_method

from .schema import ModelRef, Recipe


def _is_hub_id(ref: ModelRef) -> bool:
    """A reference that is not a local folder and looks like `owner/name` (no lookup on the hub)."""
    return not Path(ref.path).expanduser().exists() and ref.path.count("/") == 1 and not ref.path.startswith((".", "/", "~"))


def model_card(recipe: Recipe, recipe_text: str, output_name: str, version: str,
               revisions: dict[str, str | None]) -> str:
    """Front matter (hub base models, tags), the method and its paper, the inputs with revisions, the
    library version, how to load the model, and the recipe verbatim."""
    method = get_recipe_method(recipe.merge_method)
    refs = recipe.referenced_models()
    hub = [ModelRef.parse(r).path for r in refs if _is_hub_id(ModelRef.parse(r))]
    lines = ["---"]
    if hub:
        lines += ["base_model:"] + [f"- {h}" for h in hub]
    lines += ["library_name: transformers", "tags:", "- mergelm", "- merge", "---", "", f"# {output_name}", "",
              f"This model was merged with mergelm {version} from a mergekit-compatible recipe.", "",
              "## Merge method", ""]
    paper = f"[{method.paper}]({method.url})" if method.url else method.paper
    base = ModelRef.parse(recipe.base_model) if recipe.base_model else None
    using = f", with {base} as the base" if base is not None and method.base == "required" else ""
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
              "## Recipe", "", "```yaml", recipe_text.rstrip("\n"), "```", "",
              "The run's resolved settings, inputs and library versions are in `merge_manifest.json`.", ""]
    return "\n".join(lines)
