"""The README's Python blocks are the public API: they must run as written (on CPU)."""

import re
from pathlib import Path

import pytest

BLOCKS = re.findall(r"```python\n(.*?)```", (Path(__file__).parent.parent / "README.md").read_text(), re.S)


def test_readme_has_the_seed_blocks():
    assert len(BLOCKS) >= 3
    assert "NeuralMemory(" in BLOCKS[0] and "MemoryAsContextTransformer(" in BLOCKS[1]


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index):
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {})
