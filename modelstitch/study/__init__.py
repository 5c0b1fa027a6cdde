"""Layer 5, studies: grids of cells over pairs of networks, their store, executors, presets and figures.

A `Study` trains and evaluates every cell (sender, sender layer, receiver,
receiver layer) of its pairs, pair by pair, into a resumable SQLite
`ResultStore`; `StudyResults` reads a run folder back as matrices, CSV and
heatmaps; presets (`run_preset`) set up the paper's studies from the zoo.
"""

from ._config import study_from_file
from ._executors import EXECUTORS, PairFailure, run_local, run_ray
from ._presets import (
    PRESETS,
    Preset,
    PresetOptions,
    build_preset_study,
    load_dataset,
    open_preset_study,
    run_preset,
    zoo_models,
)
from ._results import StudyResults
from ._store import CELL_COLUMNS, ResultStore, read_run_meta
from ._study import Cell, Study

__all__ = [
    "CELL_COLUMNS",
    "EXECUTORS",
    "PRESETS",
    "Cell",
    "PairFailure",
    "Preset",
    "PresetOptions",
    "ResultStore",
    "Study",
    "StudyResults",
    "build_preset_study",
    "load_dataset",
    "open_preset_study",
    "read_run_meta",
    "run_local",
    "run_ray",
    "study_from_file",
    "run_preset",
    "zoo_models",
]
