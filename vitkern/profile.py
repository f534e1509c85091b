"""Attention-cost-vs-resolution profiler (``vitkern profile``); the code lives in :mod:`vitkern.profiler`.

Python use::

    from vitkern.profile import count_model, main
    count_model("vit-b", 384).macs / 1e9      # 55.48 GMACs (ViT-B/16 at 384, as timm reports)
    main(["--analytic-only", "--models", "vit-b", "--resolutions", "224", "384"])
"""
from vitkern.profiler import (Config, Counts, Measurement, ModelSpec, build, count_config, count_model,
                              known_models, main, measure_config, parse_model, run_profile, seed_figures,
                              train_step_scaling)

__all__ = ["main", "Counts", "count_config", "count_model", "Measurement", "measure_config", "run_profile",
           "seed_figures", "Config", "ModelSpec", "build", "known_models", "parse_model", "train_step_scaling"]
