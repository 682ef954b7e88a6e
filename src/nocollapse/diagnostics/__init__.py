"""Collapse diagnostics: numbers, pictures and alarms for prototypes and embeddings.

* :mod:`.prototypes` -- unique prototypes at a cosine-distance threshold ε (blocked,
  exact greedy cover), the unique-vs-ε curve, pairwise cosine statistics.
* :mod:`.assignments` -- per-step assignment statistics from probabilities ``[N, K]``:
  entropies, effective number of prototypes, utilisation, teacher-student KL, mixture
  weights.
* :mod:`.embeddings` -- RankMe effective rank, singular values, std of normalised
  embeddings, norm of the mean direction.
* :mod:`.alarms` -- :class:`AlarmMonitor`, which fires each collapse alarm once.
* :mod:`.plots` -- PNG figures (unique vs ε, uniformity plot, spectrum, training curves).
* :mod:`.report` -- everything at once as a JSON-serialisable dict and a text table.
* :mod:`.foreign` -- load prototypes from checkpoints trained elsewhere.

Example::

    from nocollapse.diagnostics import load_prototypes, prototype_report, format_report
    protos = load_prototypes("dino_checkpoint.pth", "teacher.head.last_layer.weight")
    print(format_report(prototype_report(protos)))
"""

from .alarms import ALARM_NAMES, ALARM_RULES, COLLAPSE_ALARMS, WARNINGS, Alarm, AlarmMonitor, AlarmRule
from .assignments import assignment_stats, mixture_stats, prototype_utilization, teacher_student_kl
from .embeddings import (
    alpha_req,
    direction_rank,
    effective_rank,
    effective_rank_from_singular_values,
    embedding_std,
    lidar,
    mean_direction_norm,
    mean_pairwise_cosine,
    singular_values,
)
from .foreign import CheckpointError, PrototypeKeyError, list_candidates, load_prototypes
from .plots import (
    plot_prototype_uniformity,
    plot_spectrum,
    plot_training_curves,
    plot_unique_vs_eps,
    project_to_circle,
)
from .prototypes import (
    STANDARD_EPS,
    UniqueEstimate,
    default_eps_grid,
    pairwise_cosine_stats,
    prototype_geometry,
    unique_estimate,
    unique_curve,
    unique_fraction,
    unique_prototypes,
)
from .report import flat_metrics, format_report, prototype_report, report_warnings, write_plots

__all__ = [
    "ALARM_NAMES",
    "ALARM_RULES",
    "AlarmRule",
    "COLLAPSE_ALARMS",
    "WARNINGS",
    "Alarm",
    "AlarmMonitor",
    "CheckpointError",
    "PrototypeKeyError",
    "STANDARD_EPS",
    "alpha_req",
    "assignment_stats",
    "default_eps_grid",
    "direction_rank",
    "effective_rank",
    "effective_rank_from_singular_values",
    "embedding_std",
    "flat_metrics",
    "format_report",
    "lidar",
    "list_candidates",
    "load_prototypes",
    "mean_direction_norm",
    "mean_pairwise_cosine",
    "mixture_stats",
    "pairwise_cosine_stats",
    "plot_prototype_uniformity",
    "plot_spectrum",
    "plot_training_curves",
    "plot_unique_vs_eps",
    "project_to_circle",
    "prototype_report",
    "report_warnings",
    "prototype_utilization",
    "singular_values",
    "teacher_student_kl",
    "unique_curve",
    "unique_fraction",
    "unique_estimate",
    "UniqueEstimate",
    "prototype_geometry",
    "unique_prototypes",
    "write_plots",
]
