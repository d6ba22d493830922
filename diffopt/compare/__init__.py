"""Side-by-side comparison: a grid of configurations x shot counts x seeds, trained on the same
task streams under the same budget and scored on exactly the same evaluation tasks.

A configuration is a label and the ``diffopt train`` options that differ from the defaults, e.g.
``{"meta_sgd": {"algorithm": "maml", "inner_optimizer": "meta_sgd"}}``. Each (configuration,
K, seed) run is trained and evaluated in a process of its own (so its memory is its own),
in ``OUT/runs/<label>-k<K>-seed<S>``; its ``evaluation.json`` records the config, the settings
and the result. Re-running the comparison skips finished runs, resumes interrupted ones from
their checkpoint, and restarts runs whose configuration changed. The grid's ``results.json``
holds every run's per-task scores; ``report.md`` and the plots are computed from it alone
(``aggregate``), so any table can be recomputed.

Three parts: ``grid`` (the grid file's schema, defaults and expansion), ``results`` (aggregation,
table, report) and ``runs`` (running the grid's runs).
"""

from diffopt.compare.grid import (
    GRID_DEFAULTS,
    GRID_KEYS,
    PER_RUN_OPTIONS,
    load_grid_file,
    product_configs,
    run_name,
    shared_train_options,
    with_shared_options,
)
from diffopt.compare.results import (
    ComparisonRow,
    aggregate,
    differing_settings,
    format_table,
    warning_lines,
    write_report,
)
from diffopt.compare.runs import compare, run_one, same_run

__all__ = ["GRID_DEFAULTS", "GRID_KEYS", "PER_RUN_OPTIONS", "ComparisonRow",
           "aggregate", "compare", "differing_settings", "format_table", "load_grid_file", "product_configs",
           "run_name", "run_one", "same_run", "shared_train_options", "warning_lines", "with_shared_options",
           "write_report"]
