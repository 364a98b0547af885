"""The README as a new user reads it: its self-contained snippets run and
print what the text says, and the examples it gives of what fits are true."""

from __future__ import annotations

import contextlib
import io
import re

import pytest
import torch

import pointsparse as ps
from pointsparse.coords import KeyLayout
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


def key_bits(max_batch: int, spans: tuple[int, int, int]) -> int:
    """README's rule: bits(max batch + 1) + bits(x span) + bits(y span) + bits(z span)."""
    return sum(max(0, (v - 1).bit_length()) for v in (max_batch + 1, *spans))  # ceil(log2(v))


def test_the_coordinate_sets_the_readme_gives_as_fitting_fit():
    """The README named 'three axes of 2**20 voxels with 4095 batches' as a set
    that fits the 63 key bits: 12 + 3 * 20 = 72 bits, refused. Every example
    it gives is checked here against its own rule and against KeyLayout."""
    text = " ".join(README.split())
    examples = re.findall(r"three axes of 2\*\*(\d+) voxels with (\d+) batches", text)
    assert examples, "the README's key-layout examples moved"
    for exponent, batches in examples:
        span, max_batch = 2 ** int(exponent), int(batches) - 1
        assert key_bits(max_batch, (span,) * 3) <= 63, (exponent, batches)
        layout = KeyLayout.fit([0, 0, 0, 0], [max_batch, span - 1, span - 1, span - 1])
        assert sum(layout.bits) <= 63
        coords = torch.tensor([[0, 0, 0, 0], [max_batch, span - 1, span - 1, span - 1]], dtype=torch.int32)
        ps.SparseTensor(torch.zeros(2, 1), coords)  # (validates the keys)
    assert "a whole int32 axis" in text
    int32_axis = KeyLayout.fit([0, -2**31, 0, 0], [0, 2**31 - 1, 0, 0])
    assert int32_axis.bits == (0, 32, 0, 0)


def test_the_rule_refuses_one_bit_more():
    """The rule the README states is the one KeyLayout applies: one more
    batch bit past 63 is refused, naming the bits."""
    assert key_bits(4095, (2**17,) * 3) == 63
    KeyLayout.fit([0, 0, 0, 0], [4095, 2**17 - 1, 2**17 - 1, 2**17 - 1])
    with pytest.raises(ValueError, match="64 bits in all"):
        KeyLayout.fit([0, 0, 0, 0], [4096, 2**17 - 1, 2**17 - 1, 2**17 - 1])


def test_the_fuzz_families_the_readme_names_are_fuzz_cases_families():
    """`python tests/fuzz_cases.py FAMILY SEED` takes a key of FAMILIES; the
    README described them ('tensors, kernel maps, train flags, ...') in words
    that are no keys, so the command it gives failed with a KeyError."""
    import fuzz_cases

    text = " ".join(README[README.index("The suite also fuzzes"):].split())
    named = re.search(r"its families: ([^;.]*)", text)
    assert named, "the README's list of fuzz families moved"
    assert set(re.findall(r"`(\w+)`", named[1])) == set(fuzz_cases.FAMILIES)


def test_the_tensors_backends_kernel_maps_and_layers_snippets_run_in_turn():
    """The README's snippets of its Tensors and voxels, Backends, Kernel maps
    and Layers sections, run one after another as a reader would, with
    nothing but the Ten lines' imports given: each makes the names it uses
    (they used ``points``, ``conv``, ``coords`` and ``o`` made nowhere)."""
    torch.manual_seed(0)
    scope = {"torch": torch, "ps": ps}
    try:
        exec(compile(python_block("### Tensors and voxels"), "README.md: Tensors", "exec"), scope)  # noqa: S102
        x = scope["x"]
        assert x.feats.shape[1] == 3 and x.coords.dtype == torch.int32 and x.stride == (1, 1, 1)
        exec(compile(python_block("### Backends"), "README.md: Backends", "exec"), scope)  # noqa: S102
        assert ps.get_backend() == "core" and scope["y"].feats.shape == (x.coords.shape[0], 32)
    finally:
        ps.backend("auto")
    exec(compile(python_block("### Kernel maps"), "README.md: Kernel maps", "exec"), scope)  # noqa: S102
    assert torch.equal(scope["in_idx"], scope["out_idx"])  # the centre offset of a submanifold map
    assert torch.equal(scope["up"].out_coords, x.coords)
    exec(compile(python_block("### Layers"), "README.md: Layers", "exec"), scope)  # noqa: S102
    assert torch.equal(scope["y"].coords, x.coords) and scope["y"].feats.shape[1] == 32


def test_the_dependency_graphs_ignore_example_names_layers_of_its_minkunet():
    """The dependency graph's snippet (on MinkUNet(4, 19)) gave ignore=["head"]: MinkUNet has no "head",
    and plan refuses a name that is no layer of the model. The names it gives are MinkUNet's, and the plan
    leaves out every group they produce."""
    from pointsparse.models import MinkUNet
    from pointsparse.prune import graph as G

    start = README.index("from pointsparse.prune import graph as G")
    snippet = README[start:README.index("```", start)]
    found = re.search(r"ignore=\[([^\]]*)\]", snippet)
    assert found, "the README's ignore example moved"
    names = re.findall(r'"([^"]+)"', found[1])
    assert names
    torch.manual_seed(0)
    model = MinkUNet(4, 19)
    coords = torch.unique(torch.randint(0, 12, (600, 3)), dim=0)
    coords = torch.cat([torch.zeros(len(coords), 1, dtype=coords.dtype), coords], 1).int()
    graph = G.DependencyGraph(model, ps.SparseTensor(torch.randn(len(coords), 4), coords))
    keep = G.plan(graph, 0.5, ignore=names)
    left_out = {g.name for g in graph.groups} - set(keep)
    assert left_out and all(any(n == name or n.startswith(name + ".") for name in names) for n in left_out)


def test_the_pruning_and_formats_snippets_run_in_turn():
    """The Pruning section's first snippet and the Sparse formats one, run
    one after another with the Ten lines' imports alone: they used
    ``conv``, ``sparse_conv``, ``model``, ``x``, ``layer``, ``w`` and ``X``
    made nowhere (a tutorial review's finding)."""
    from pointsparse.nn.modules import Conv3d

    torch.manual_seed(0)
    scope = {"torch": torch, "ps": ps}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(python_block("### Pruning"), "README.md: Pruning", "exec"), scope)  # noqa: S102
    assert "sparsity" in out.getvalue() and "flops" in out.getvalue().lower()
    sparse_conv = scope["sparse_conv"]
    assert isinstance(sparse_conv, Conv3d) and hasattr(sparse_conv, "weight_mask")
    kept = sparse_conv.weight_mask.reshape(27, 4, 4, 32)  # (2:4 along C_in, then panels: every group of 4 keeps <= 2)
    assert int(kept.sum(2).max()) <= 2
    exec(compile(python_block("### Sparse formats"), "README.md: Sparse formats", "exec"), scope)  # noqa: S102
    fast, x = scope["fast"], scope["x"]  # (the compressed copy of the 90% pruned conv: its engine weight's)
    assert abs(float((fast.engine_weight == 0).float().mean()) - 0.9) < 0.01
    reference = ps.nn.Conv3d(4, 32, 3)
    with torch.no_grad():
        reference.weight.copy_(fast.engine_weight)
    assert torch.allclose(scope["y"].feats, reference(x).feats, atol=1e-5)
    assert torch.allclose(scope["W"] @ scope["X"], scope["w"] @ scope["X"], atol=1e-5)


def test_the_models_snippet_runs_and_gives_the_shapes_its_comments_name():
    """The README showed no Python call of SPVCNN (its point arguments were
    in its docstring alone: an SPVCNN review): the Models snippet runs a
    MinkUNet and an SPVCNN on one generated scan, as its comments say."""
    torch.manual_seed(0)
    scope: dict = {"torch": torch, "ps": ps}
    exec(compile(python_block("### Models"), "README.md: Models", "exec"), scope)  # noqa: S102
    b, scan = scope["b"], scope["scan"]
    assert scope["logits"].shape == (len(b.input.coords), 9) and b.input.feats.shape[1] == 7
    assert scope["per_point"].shape == (len(scan.xyz), 9) and len(b.labels) == len(b.input.coords)
    assert torch.equal(torch.floor(b.points).int(), b.input.coords[b.inverse, 1:])
