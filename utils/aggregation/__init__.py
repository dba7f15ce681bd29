"""Results as data: collect the scripts' result JSONs into a tidy table, group over seeds, write the
paper's tables (markdown, LaTeX) and figures (matplotlib)."""
from utils.aggregation.aggregate import AggregateOutputs, aggregate
from utils.aggregation.collect import COLUMNS, Collector, collect, variant_name
from utils.aggregation.tables import Table, all_tables, comparison_tables, drop_rate_tables, group_rows, merge_tables

__all__ = ["AggregateOutputs", "COLUMNS", "Collector", "Table", "aggregate", "all_tables", "collect", "comparison_tables",
           "drop_rate_tables", "group_rows", "merge_tables", "variant_name"]
