"""Turn result JSONs of the GLUE and LLM scripts into a tidy table, seed statistics, the paper's tables
(markdown + LaTeX) and figures (accuracy vs drop rate; merge methods with / without DARE).

    python scripts/aggregate_results.py RESULTS_FOLDER_OR_FILE [...] --out results_summary [--split test]

Folders are searched for the scripts' result files (save_model_results/, save_merge_results/,
save_gen_*_results/**/summary.json); a JSON of another schema is skipped with a warning naming it.
Outputs (in --out): results_tidy.csv / .jsonl, results_groups.csv (mean ± std over seeds, n), tables.md,
tables.tex, drop_rate.png, merge.png (each figure with <name>.sources.txt), skipped.txt.
See utils/aggregation/ for the columns, the variant names and the table layouts.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from utils.cli import HelpFormatter, error_line  # noqa: E402
from utils.aggregation import aggregate  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("paths", nargs="+", help="result folders (e.g. a --save_dir) or result JSON files")
    parser.add_argument("--out", default="results_summary", help="output folder")
    parser.add_argument("--split", default="test", help="split shown in tables and figures (test = GLUE dev)")
    parser.add_argument("--title", default=None, help="figure title")
    parser.add_argument("--figure_metric", default=None, help="also draw drop_rate_<metric>.png for this metric (e.g. loss)")
    parser.add_argument("--quiet", action="store_true", help="do not print the tables")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from utils.records import OutputRefusedError

    try:
        outputs = aggregate(args.paths, args.out, split=args.split, figure_title=args.title,
                            figure_metric=args.figure_metric)
    except (OutputRefusedError, OSError) as error:
        print(f"error: {error_line(error)}", file=sys.stderr)
        return 2
    for warning in outputs.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not outputs.rows:
        print(f"error: no result files found in {', '.join(args.paths)}", file=sys.stderr)
        return 2
    if not args.quiet:
        for table in outputs.tables:
            print(table.markdown())
    sources = len({row["source"] for row in outputs.rows})
    print(f"{len(outputs.rows)} values from {sources} files, {len(outputs.groups)} groups, {len(outputs.tables)} tables; "
          f"skipped {len(outputs.warnings)} files -> " + ", ".join(str(p) for p in outputs.files.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
