"""The Python examples in README.md, docs/index.md, docs/solvers.md and docs/gradients.md run as written.

The blocks of one file run in order in one namespace (later blocks may use
earlier names, as a reader would). docs/sven.md is covered by test_sven_docs.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FILES = ["README.md", "docs/index.md", "docs/solvers.md", "docs/gradients.md"]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", FILES)
def test_python_blocks_run(name: str) -> None:
    text = (ROOT / name).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, f"{name} has no python examples"
    torch.manual_seed(0)
    namespace: dict[str, object] = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"{name}[block {i}]", "exec"), namespace)
