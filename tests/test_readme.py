"""The README's library example runs as written and its comments tell the truth."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_library_example_runs(capsys):
    blocks = _python_blocks()
    assert blocks, "README has no python example"
    namespace = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    assert tuple(namespace["out"].shape) == (8, 99, 100)
    assert tuple(namespace["h_n"].shape) == (1, 8, 100)
    printed = capsys.readouterr().out
    assert "{'layers.0.W': (32, 32), 'layers.0.U': (100, 100)}" in printed
    x = namespace["x"]
    assert torch.allclose(namespace["small"](x)[0], namespace["out"], atol=1e-5)
    assert len(blocks[0].strip().splitlines()) <= 12
