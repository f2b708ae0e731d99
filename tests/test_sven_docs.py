"""The Python examples in docs/sven.md run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "sven.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S) if DOC.exists() else []


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_doc_example_runs(code: str) -> None:
    torch.manual_seed(0)
    exec(compile(code, str(DOC), "exec"), {})


def test_docs_have_examples() -> None:
    assert len(BLOCKS) >= 3
