"""The README as a new user reads it: its self-contained snippets run and
print what the text says."""

from __future__ import annotations

import contextlib
import io

import torch

from reference import ROOT

README = (ROOT / "README.md").read_text()


def python_block(heading: str) -> str:
    """The first ```python block after ``heading``."""
    start = README.index(heading)
    block = README.index("```python\n", start) + len("```python\n")
    return README[block:README.index("```", block)]


def test_ten_lines_run_and_give_the_shapes_their_comments_name():
    code = python_block("## Ten lines")
    scope: dict = {}
    out = io.StringIO()
    torch.manual_seed(0)
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md: Ten lines", "exec"), scope)  # noqa: S102 - the README's own snippet
    x, y, conv, per_point = scope["x"], scope["y"], scope["conv"], scope["per_point"]
    assert conv.weight.shape == (27, 3, 32) and conv.weight.grad.shape == (27, 3, 32)
    assert torch.equal(y.coords, x.coords) and y.feats.shape == (x.coords.shape[0], 32)
    assert per_point.shape == (50_000, 32)
    assert "torch.Size([27, 3, 32]) torch.Size([50000, 32])" in out.getvalue()
