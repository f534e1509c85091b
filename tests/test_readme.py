"""The README's Python examples run as written (on this machine: CPU-only in CI)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    code = BLOCKS[index]
    if "timm" in code:
        pytest.importorskip("timm")
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": f"readme_{index}"})
