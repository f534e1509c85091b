"""Attention cost vs image resolution: the ``vitkern profile`` command and its building blocks.

* :func:`count_model` / :func:`count_config` - FLOPs (whole model, attention core, attention
  projections, MLP) and the naive path's attention-score shapes, counted with
  ``torch.utils.flop_counter`` on the meta device (free);
* :func:`measure_config` - time, throughput and peak memory per backend (naive, sdpa, vitkern);
* :func:`run_profile` - both, for a list of configs, with the table, CSV, JSON and plot;
* :func:`seed_figures` - the seed chapter's figures recomputed (and corrected);
* :func:`train_step_scaling` - d2l exercise 1: training-step time vs ``img_size``;
* :func:`main` - the command line (``vitkern profile --help``).
"""
from vitkern.profiler.cli import main
from vitkern.profiler.counting import Counts, count_config, count_model
from vitkern.profiler.measure import Measurement, measure_config
from vitkern.profiler.run import run_profile
from vitkern.profiler.seed import seed_figures
from vitkern.profiler.specs import Config, ModelSpec, build, known_models, parse_model
from vitkern.profiler.trainstep import train_step_scaling

__all__ = ["main", "Counts", "count_config", "count_model", "Measurement", "measure_config", "run_profile",
           "seed_figures", "Config", "ModelSpec", "build", "known_models", "parse_model", "train_step_scaling"]
