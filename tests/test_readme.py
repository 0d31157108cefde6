"""The README's Python examples run as written (its quick start is what users copy)."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_python_examples():
    assert len(_python_blocks()) >= 2


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_python_examples_run_in_order():
    # One namespace, as a reader runs them: later blocks use earlier names.
    torch.manual_seed(0)
    namespace = {}
    for block in _python_blocks():
        exec(compile(block, str(README), "exec"), namespace)
    # The last example: the padded batch of four sequences, the second empty.
    out = namespace["out"]
    assert out.shape[0] == 4 and out.shape[-1] == 768
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert not torch.equal(out[0], torch.zeros_like(out[0]))
