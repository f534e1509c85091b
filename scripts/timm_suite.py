"""Run timm's own model tests with every ``timm.create_model`` result put through ``vitkern.optimize``.

timm's test suite is not part of its wheel, so point this at a timm checkout (any clone whose
``tests/test_models.py`` matches the installed timm closely enough):

    python scripts/timm_suite.py --timm-repo ~/src/pytorch-image-models            # optimized
    python scripts/timm_suite.py --timm-repo ~/src/pytorch-image-models --plain    # timm as it is
    python scripts/timm_suite.py --timm-repo ... --models vit_tiny_patch16_224 -- -x -k torchscript

It copies the test file into a temporary folder beside a conftest.py that (unless ``--plain``)
wraps ``timm.create_model`` so every model is converted in place, keeps only the tests of the
chosen models, runs pytest there and prints pytest's summary. Nothing from timm's tests is kept.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

# The ViT-family models of the compatibility check: one or two per timm family vitkern converts
# or must leave working (hybrids, relative-position and cross-attention variants, a non-attention MLP).
DEFAULT_MODELS = [
    "vit_tiny_patch16_224", "vit_small_patch16_224", "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224",
    "swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256", "pvt_v2_b0", "pvt_v2_b2_li", "test_vit",
    "test_vit2", "test_vit3", "test_vit4", "swin_s3_tiny_224", "mobilevit_xxs", "pit_ti_224", "coat_lite_tiny",
    "vit_tiny_r_s16_p8_224", "eva02_tiny_patch14_224", "cait_xxs24_224", "crossvit_tiny_240",
    "vit_wee_patch16_reg1_gap_256", "mixer_s16_224",
]

CONFTEST = '''
import os
import warnings

import timm
import timm.models

MODELS = set(os.environ["VITKERN_SUITE_MODELS"].split(","))

if os.environ.get("VITKERN_SUITE_PLAIN") != "1":
    import vitkern
    from vitkern.convert import OptimizeWarning

    _create_model = timm.create_model

    def create_model(*args, **kwargs):
        model = _create_model(*args, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)  # what is skipped is timm's own code, still tested
            return vitkern.optimize(model)

    timm.create_model = create_model
    timm.models.create_model = create_model


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        name = getattr(item, "callspec", None) and item.callspec.params.get("model_name")
        (keep if name in MODELS else drop).append(item)
    items[:] = keep
    config.hook.pytest_deselected(items=drop)
'''


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--timm-repo", required=True, help="a checkout of timm (pytorch-image-models)")
    p.add_argument("--plain", action="store_true", help="run timm unconverted (the baseline)")
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="model names to keep")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = p.parse_args(argv)
    source = os.path.join(args.timm_repo, "tests", "test_models.py")
    if not os.path.isfile(source):
        p.error(f"--timm-repo: {source} does not exist")
    with tempfile.TemporaryDirectory(prefix="vitkern-timm-suite-") as tmp:
        shutil.copy(source, os.path.join(tmp, "test_models.py"))
        with open(os.path.join(tmp, "conftest.py"), "w", encoding="utf-8") as f:
            f.write(textwrap.dedent(CONFTEST))
        env = dict(os.environ, VITKERN_SUITE_MODELS=",".join(args.models), VITKERN_SUITE_PLAIN="1" if args.plain else "0")
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "-W", "ignore::pytest.PytestUnknownMarkWarning", "--rootdir", tmp,
               "-o", "addopts=",
               tmp, *args.pytest_args]
        return subprocess.call(cmd, cwd=tmp, env=env)


if __name__ == "__main__":
    sys.exit(main())
