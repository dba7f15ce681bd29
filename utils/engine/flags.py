"""merge_models.py's flags, declared once: the parser, the checks argparse cannot make alone, and the
translation of parsed flags into a StreamMergeJob (flags → one plan: utils/engine/streaming.py) or a RecipeJob.

Light imports only: torch and transformers load after the arguments are parsed (--help answers at once).
"""
from __future__ import annotations

import argparse
import os
import sys

from model_merging_methods.frontier import frontier_parameters_help
from model_merging_methods.options import DEFAULT_TIE_ORDER, TIE_ORDERS
from model_merging_methods.registry import available_methods, get_method
from utils.cli import HelpFormatter, drop_rate, positive_float, run_entry, warnings_to_stderr
from utils.engine.choices import DTYPE_NAMES, MERGE_PARTS, VOCAB_ALIGNMENTS

STREAMING_METHODS = [name for name in available_methods()
                     if get_method(name).streamable and not get_method(name).statistics]
# the paper's options: flags of the paper's methods only (mergekit's methods take their own parameters)
DARE_FLAGS = ("drop_rate", "no_rescale", "rescale_mode", "mask_strategy", "weight_format")   # any method with a base
PAPER_FLAGS = DARE_FLAGS + ("ties_normalize", "norm_mode", "norm_alpha", "norm_beta", "norms", "norms_from")
MANIFEST_FLAGS = {"from_manifest", "output_dir", "overwrite", "threads", "no_progress"}
# flags that describe a merge; a recipe (--config) describes it instead, so they cannot be combined with it
METHOD_FLAGS = ("--base_model", "--models", "--method", "--from_manifest", "--weights", "--scaling_coefficient",
                "--drop_rate", "--weight_mask_rate", "--no_rescale", "--rescale_mode", "--mask_strategy",
                "--weight_format", "--density", "--ties_normalize", "--slerp_t", "--dtype",
                "--exclude_param_names_regex", "--vocab_alignment", "--files_from", "--allow_noop", "--parameter")


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    parser.add_argument("--base_model", default=None, help="pretrained backbone θ_pre: folder or hub id")
    parser.add_argument("--models", nargs="+", help="fine-tuned models: folders or hub ids (required)")
    parser.add_argument("--method", choices=STREAMING_METHODS, help="registry name of the merge (required)")
    parser.add_argument("--output_dir", required=True,
                        help="folder to create (written atomically); must not be, contain or lie inside an input")
    parser.add_argument("--config", default=None, metavar="RECIPE",
                        help="a mergekit-compatible YAML recipe instead of the method flags (docs/recipes.md)")
    parser.add_argument("--intermediate_dir", default=None,
                        help="multi-document recipes: where earlier documents' outputs go (reused when made from "
                             "the same document)")
    parser.add_argument("--parameter", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="mergekit-named and frontier methods: any parameter the method declares (e.g. normalize=false, "
                             "rescale=true, gamma=0.02, t=0.001 for nearswap); docs/recipes.md. Frontier methods (default): "
                             + frontier_parameters_help())
    parser.add_argument("--tie_order", choices=TIE_ORDERS, default=None,
                        help="mergekit's ties / breadcrumbs*: which entries tied at a rank cut-off are kept: "
                             "torch.argsort's (default: mergekit's own call, bit for bit; holds whole tensors: "
                             "~3 GiB for a 65M-entry embedding) or the first in flat order (index: a stable sort, "
                             "as mergekit on CUDA; streams in pieces)")
    parser.add_argument("--from_manifest", default=None, metavar="MANIFEST",
                        help="re-run the merge a merge_manifest.json records (same weights, bit for bit); "
                             "refused if an input's sha256 changed. Takes only --output_dir, --overwrite, "
                             "--threads, --no_progress")
    parser.add_argument("--weights", type=float, nargs="+", default=None,
                        help="per-model weights (average: weighted mean; TA/TIES: w_k on each delta; default 1 each)")
    parser.add_argument("--scaling_coefficient", type=float, default=1.0,
                        help="λ of task arithmetic / TIES / norm_adaptive; the overall scale of a frontier method "
                             "(scaling_factor; alpha of tsv_merging; beta of lines)")
    parser.add_argument("--drop_rate", "--weight_mask_rate", dest="drop_rate", type=drop_rate, nargs="+", default=[0.0],
                        help="DARE drop rate p in [0, 1), one value or one per model; applied to each model first, "
                             "before any method that takes a base (not linear, karcher, passthrough) "
                             "(default: 0, no DARE)")
    parser.add_argument("--no_rescale", action="store_true", help="DropOnly: do not rescale kept entries by 1/(1-p)")
    parser.add_argument("--rescale_mode", choices=["paper", "l1"], default="paper",
                        help="paper: 1/(1-p); l1: mergekit's L1-norm match")
    parser.add_argument("--mask_strategy", choices=["random", "magnitude"], default="random",
                        help="what DARE drops: random (Bernoulli(p)) or magnitude (the int(n·p) smallest |x|)")
    parser.add_argument("--weight_format", choices=["delta_weight", "finetuned_weight"], default="delta_weight",
                        help="what DARE drops from: the delta θ_ft − θ_pre, or θ_ft itself")
    parser.add_argument("--density", type=float, nargs="+", default=[1.0],
                        help="TIES keep fraction per model; for dare_* the DARE keep rate when --drop_rate is 0 "
                             "(default: 1, nothing trimmed or dropped)")
    parser.add_argument("--ties_normalize", choices=["count", "weights"], default="count",
                        help="count: paper's disjoint mean; weights: mergekit's sum of agreeing weights")
    parser.add_argument("--norm_mode", choices=["linear", "power", "exp"], default="exp",
                        help="norm_adaptive weights from the task vectors' L2 norms L: linear 1/L, power L^-alpha, "
                             "exp exp(-beta L / mean L); normalised to sum 1")
    parser.add_argument("--norm_alpha", type=float, default=1.5, help="norm_adaptive power exponent alpha")
    parser.add_argument("--norm_beta", type=float, default=1.0, help="norm_adaptive exp rate beta")
    norms = parser.add_mutually_exclusive_group()
    norms.add_argument("--norms", type=float, nargs="+", default=None,
                       help="norm_adaptive: the L2 norm of each model's task vector (default: computed in a first pass)")
    norms.add_argument("--norms_from", default=None,
                       help="norm_adaptive: analysis.json of analyze_task_vectors.py (or its folder) to read the norms from")
    parser.add_argument("--slerp_t", type=float, default=0.5, help="SLERP t (0 = base, 1 = the model)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every DARE mask (with model index, tensor name)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="output dtype (default: the base's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1),
                        help="worker threads merging pieces of large tensors concurrently (>= 1; more than the "
                             "CPUs is clamped)")
    parser.add_argument("--exclude_param_names_regex", nargs="*", default=[],
                        help="tensors matching any regex (re.match) are copied from the base unchanged")
    parser.add_argument("--vocab_alignment", choices=VOCAB_ALIGNMENTS, default="error",
                        help="pad_mean: the paper's pad-token rows set to the mean of old rows")
    parser.add_argument("--merge_part", choices=MERGE_PARTS, default="all",
                        help="multimodal models (flags and recipes): merge every tensor, or the language model only "
                             "(vision tower, projector and other modules copied from the base)")
    parser.add_argument("--files_from", default=None,
                        help="model whose config/tokenizer/chat template are copied (default: the base, or the "
                             "model whose vocabulary the aligned output has)")
    parser.add_argument("--max_shard_size_gb", type=positive_float, default=5.0, help="output shard size in GiB")
    parser.add_argument("--allow_pickle", action="store_true",
                        help="accept .bin checkpoints (torch.load with weights_only=True)")
    parser.add_argument("--allow_noop", action="store_true",
                        help="kept for recorded runs: no method refuses no-op settings now (they warn)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output folder (never an input)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> None:
    """What argparse cannot say alone: a recipe takes no method flags; --models/--method unless
    --from_manifest, which takes nothing else."""
    if args.config is not None:
        given = [a.split("=")[0] for a in argv if a.split("=")[0] in METHOD_FLAGS]
        if given:
            parser.error(f"--config takes the merge from the recipe; remove {', '.join(dict.fromkeys(given))}")
        return
    if args.intermediate_dir is not None:
        parser.error("--intermediate_dir is for recipes (--config)")
    if args.method is not None and get_method(args.method).kind == "group":
        method = get_method(args.method)
        given = [f"--{dest}" for dest in PAPER_FLAGS if getattr(args, dest) != parser.get_default(dest)
                 and not (dest in DARE_FLAGS and method.paper_dare)]
        if given:
            dare = [flag for flag in given if flag[2:] in DARE_FLAGS]
            parser.error(f"{', '.join(dare)}: the paper's DARE applies to methods that take a base model; --method "
                         f"{args.method} treats a base as one more input" if dare else
                         f"{', '.join(given)}: the paper's options apply to the paper's methods (average_merging, "
                         f"task_arithmetic, ties_merging, norm_adaptive, dare); --method {args.method} is mergekit's "
                         f"(docs/methods.md, 'One registry, one meaning per name')")
    elif args.parameter or args.tie_order is not None:
        parser.error("--parameter and --tie_order are for mergekit-named methods and recipes")
    if args.from_manifest is None:
        missing = [flag for flag, value in (("--models", args.models), ("--method", args.method)) if not value]
        if missing:
            parser.error(f"the following arguments are required: {', '.join(missing)} (or --from_manifest)")
        return
    extra = [f"--{dest}" for dest, value in vars(args).items()
             if dest not in MANIFEST_FLAGS and value != parser.get_default(dest)]
    if extra:
        parser.error(f"--from_manifest re-runs the recorded merge; it does not take {', '.join(extra)}")


def precheck(args: argparse.Namespace) -> int | None:
    """The refusals that need no tensor library, before torch loads (utils/precheck.py): the recipe file
    and its schema, the model sources (local folders must exist), --from_manifest, the output folder."""
    from utils.precheck import existing_file, model_source, model_sources, output_folder, refused

    from model_merging_methods import MergeError

    def check() -> None:
        inputs: dict[str, str | None] = {}
        if args.config:
            from utils.recipes.schema import ModelRef, load_recipe_file

            recipes, _ = load_recipe_file(args.config)
            names = {recipe.name for recipe in recipes if recipe.name}
            for recipe in recipes:
                for reference in recipe.referenced_models():
                    ref = ModelRef.parse(reference)
                    if ref.path not in names:
                        model_source(ref.path, f"{args.config}: model")
                        model_source(ref.adapter, f"{args.config}: adapter of {ref.path}", "adapter folder")
                        inputs[f"the input model {ref.path}"] = ref.path
            if args.intermediate_dir:
                inputs["--intermediate_dir"] = args.intermediate_dir
        elif args.from_manifest:
            existing_file(args.from_manifest, "--from_manifest", "manifest file")
        else:
            method = get_method(args.method)
            if method.needs_base and args.base_model is None:   # before the paths, as the engine says it
                raise MergeError(f"{method.name} needs a base (pretrained) model")
            model_source(args.base_model, "--base_model")
            model_sources(args.models, "--models")
            inputs = {"the base input": args.base_model, "the files_from input": args.files_from,
                      **{f"the model {i} input": model for i, model in enumerate(args.models or [])}}
        output_folder(args.output_dir, args.overwrite, inputs)

    return refused("merge_models.py", check, (MergeError,))


def job_from_args(args: argparse.Namespace):
    from model_merging_methods import DareOptions, MergeOptions
    from utils.engine.streaming import StreamMergeJob

    single = lambda values: values[0] if len(values) == 1 else values  # noqa: E731
    dare = DareOptions(drop_rate=single(args.drop_rate), rescale=not args.no_rescale,
                       strategy=args.mask_strategy, weight_format=args.weight_format,
                       rescale_mode=args.rescale_mode)
    options = MergeOptions(weights=args.weights, scaling_coefficient=args.scaling_coefficient,
                           density=single(args.density), ties_normalize=args.ties_normalize, slerp_t=args.slerp_t,
                           norm_mode=args.norm_mode, norm_alpha=args.norm_alpha, norm_beta=args.norm_beta,
                           norms=args.norms)
    return StreamMergeJob(base_model=args.base_model, models=args.models, method=args.method,
                          output_dir=args.output_dir, options=options, dare=dare, seed=args.seed,
                          dtype=args.dtype, device=args.device, exclude_regex=args.exclude_param_names_regex,
                          overwrite=args.overwrite, allow_pickle=args.allow_pickle,
                          vocab_alignment=args.vocab_alignment, files_from=args.files_from,
                          max_shard_size=max(1, int(args.max_shard_size_gb * 2**30)), progress=not args.no_progress,
                          threads=args.threads, allow_noop=args.allow_noop, norms_from=args.norms_from,
                          parameters=list(args.parameter), tie_order=args.tie_order or DEFAULT_TIE_ORDER,
                          merge_part=args.merge_part)


def recipe_job_from_args(args: argparse.Namespace):
    from utils.recipes.job import RecipeJob  # imported only for recipes: flag runs skip pydantic and YAML

    return RecipeJob(config=args.config, output_dir=args.output_dir, intermediate_dir=args.intermediate_dir,
                     seed=args.seed, device=args.device, threads=args.threads,
                     max_shard_size=max(1, int(args.max_shard_size_gb * 2**30)), overwrite=args.overwrite,
                     allow_pickle=args.allow_pickle, progress=not args.no_progress,
                     tie_order=args.tie_order or DEFAULT_TIE_ORDER, merge_part=args.merge_part)
