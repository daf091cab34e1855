"""The experiments of chapters 05 (optimisation), 06 (architecture) and 07 (batches), under the
one name chapters import (``import bnviz.experiments as ex``). The code lives by concern:

* :mod:`bnviz.runs`: runs and grids (:func:`run_grid`, the one pipeline; :class:`GridResult`,
  :class:`Cell`, :data:`ACCURACY`; runs with a probe);
* :mod:`bnviz.comparisons`: variants over the same seeds and their verdicts (:func:`compare`,
  :class:`Comparison`, :func:`caution`, tables);
* :mod:`bnviz.sweeps`: learning-rate and batch-size sweeps (:func:`lr_sweep`, :func:`max_lr`,
  :func:`batch_size_grid`, :func:`tune_lr`);
* :mod:`bnviz.verdicts`: the typed results (:class:`Verdict` with its :class:`Outcome`,
  :class:`Cause` with its :class:`CauseKind`) and the statistics behind them;
* :mod:`bnviz.probes`: the measurements (the chapters show their own copies of the ones their
  verdicts rest on; ``tests/test_chapter_cells.py`` pins them to these);
* :mod:`bnviz.figures`: the figures.
"""
from __future__ import annotations

from .comparisons import Comparison, answer_table, caution, compare, ema_vs_precise, status_table, summarize
from .probes import (Rescale, batch_stat_noise, bias_check, border_ink, deep_mlp, dropout_variance_shift,
                     grad_norms_at_init, layer_health, loss_landscape_probe, saturation_by_layer,
                     scale_invariance_check, weight_norm_growth, weight_norms)
from .runs import (ACCURACY, Cell, GridResult, Run, apply_changes, default_seeds, health_during_training,
                   landscape_during_training, run_accuracy, run_grid, run_with_probe)
from .sweeps import MaxLR, batch_size_grid, fixed_steps, lr_sweep, max_lr, sweep_summary, tune_lr
from .verdicts import (Cause, CauseKind, Outcome, SeedStats, Verdict, cell_causes, describe, epochs_seen,
                       layer_saturation,
                       fmt_stats, holm,
                       multiplicity_note, paired, pooled_std, seed_stats, verdict)

__all__ = [
    "ACCURACY", "Run", "Cell", "GridResult", "apply_changes", "default_seeds", "run_accuracy", "run_grid",
    "run_with_probe", "health_during_training", "landscape_during_training",
    "Comparison", "compare", "caution", "summarize", "ema_vs_precise", "status_table", "answer_table",
    "MaxLR", "lr_sweep", "sweep_summary", "max_lr", "fixed_steps", "batch_size_grid", "tune_lr",
    "Verdict", "Outcome", "Cause", "CauseKind", "SeedStats", "verdict", "paired", "seed_stats", "fmt_stats",
    "describe", "cell_causes", "pooled_std", "holm", "multiplicity_note",
    "Rescale", "deep_mlp", "batch_stat_noise", "bias_check", "border_ink", "dropout_variance_shift",
    "grad_norms_at_init", "layer_health", "loss_landscape_probe", "scale_invariance_check", "weight_norms",
    "weight_norm_growth", "saturation_by_layer", "epochs_seen", "layer_saturation",
]
