"""The grouped gather-GEMM-scatter convolution, kept for comparison only.

It was the engine's second method (``method="grouped"``: C++ gather, torch
``mm``/``bmm``, C++ scatter-add) until it measured slower than the fused
engine on every benchmarked layer (bench/RESULTS.md, "Plan cost and the
grouped method"); it left the package, and this pure-torch form of it
(``index_select`` gather, ``mm``/``bmm``, ``index_add_`` scatter) serves
bench/plan_grouped.py and bench/conv.py.

The pairs of a map are cut into *steps*, built once per map. Output rows are
split into tiles (``tile_rows``, grown on sparse maps); the pieces of all
offsets within one tile run one after the other. A step is a piece of one
offset (one ``torch.mm``) or a group of pieces of similar size (one
``torch.bmm`` over rows padded to the group's largest piece; the padding is
bounded by ``epsilon``, TorchSparse's idea), at most ``chunk_rows`` rows. The
identity offset of a submanifold map is one ``torch.mm`` on the whole input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pointsparse.nn import _engine

CHUNK_ROWS = 8192  # rows of one step
EPSILON = 0.25  # largest fraction of padded rows in a group
TILE_ROWS = 8192  # output rows per tile ...
MIN_PIECE_ROWS = 2048  # ... grown until an offset's piece of a tile averages this many rows


@dataclass(frozen=True)
class Step:
    """Pieces of ``offsets``, each padded to ``rows``: the pairs
    ``(in_idx, out_idx)`` of all pieces in order, and ``pos`` their rows in
    the padded ``(len(offsets) * rows)`` buffer (None: one unpadded piece)."""

    offsets: tuple[int, ...]
    offsets_tensor: torch.Tensor
    rows: int
    in_idx: torch.Tensor
    out_idx: torch.Tensor
    pos: torch.Tensor | None


@dataclass(frozen=True)
class Plan:
    identity: int | None
    steps: tuple[Step, ...]
    max_rows: int
    num_in: int
    num_out: int


def _pieces(kmap, skip, chunk_rows: int, tile_rows: int) -> list[list[tuple]]:
    """``(length, offset, start)`` pieces of at most ``chunk_rows`` pairs of
    every offset but ``skip``, in lists per output tile."""
    num_tiles = 1 if tile_rows <= 0 else max(1, -(-kmap.num_out // tile_rows))
    tiles: list[list[tuple]] = [[] for _ in range(num_tiles)]
    bounds = torch.arange(1, num_tiles, dtype=torch.int64) * max(tile_rows, 1)
    for o, n in enumerate(kmap.sizes.tolist()):
        if n == 0 or o == skip:
            continue
        lo = kmap.ptr[o]
        cuts = [0] + torch.searchsorted(kmap.out_idx[lo:lo + n], bounds).tolist() + [n]
        for t in range(num_tiles):
            a, b = cuts[t], cuts[t + 1]
            count = -(-(b - a) // chunk_rows)
            start = lo + a
            for i in range(count):
                length = (b - a) // count + (1 if i < (b - a) % count else 0)
                tiles[t].append((length, o, start))
                start += length
    return tiles


def _group(pieces: list[tuple], chunk_rows: int, epsilon: float) -> list[list[tuple]]:
    """Largest first, greedily: a piece joins the open group while the group
    stays within ``chunk_rows`` padded rows and its padding within ``epsilon``."""
    pieces = sorted(pieces, key=lambda p: (-p[0], p[1], p[2]))
    groups, i = [], 0
    while i < len(pieces):
        rows, total, j = pieces[i][0], pieces[i][0], i + 1
        while j < len(pieces):
            g = j - i + 1
            if g * rows > chunk_rows or g * rows - (total + pieces[j][0]) > epsilon * g * rows:
                break
            total += pieces[j][0]
            j += 1
        groups.append(pieces[i:j])
        i = j
    return groups


def _step(kmap, group: list[tuple]) -> Step:
    rows = group[0][0]
    spans = [torch.arange(start, start + length) for length, _, start in group]
    flat = torch.cat(spans)
    pos = None if len(group) == 1 else torch.cat([g * rows + torch.arange(len(s)) for g, s in enumerate(spans)])
    offsets = tuple(p[1] for p in group)
    return Step(offsets, torch.tensor(offsets, dtype=torch.int64), rows, kmap.in_idx[flat], kmap.out_idx[flat], pos)


def make_plan(kmap, chunk_rows: int = CHUNK_ROWS, epsilon: float = EPSILON, tile_rows: int = TILE_ROWS,
              min_piece_rows: int = MIN_PIECE_ROWS) -> Plan:
    """The steps of a CPU map (see the module's docstring)."""
    identity = _engine.identity_offset(kmap)
    busy = [n for o, n in enumerate(kmap.sizes.tolist()) if n and o != identity]
    if tile_rows and min_piece_rows and busy:  # mean rows of one offset per output row
        tile_rows = max(tile_rows, int(min_piece_rows / (sum(busy) / len(busy) / max(kmap.num_out, 1))))
    steps = tuple(_step(kmap, group) for tile in _pieces(kmap, identity, chunk_rows, tile_rows)
                  for group in _group(tile, chunk_rows, epsilon))
    max_rows = max((len(s.offsets) * s.rows for s in steps), default=0)
    return Plan(identity, steps, max_rows, kmap.num_in, kmap.num_out)


def _gather(src: torch.Tensor, idx: torch.Tensor, step: Step, buf: torch.Tensor) -> torch.Tensor:
    """``buf`` (the step's padded rows) = ``src[idx]`` at ``step.pos``, zeros elsewhere."""
    if step.pos is None:
        return torch.index_select(src, 0, idx, out=buf)
    return buf.zero_().index_copy_(0, step.pos, src.index_select(0, idx))


def _scatter(dst: torch.Tensor, idx: torch.Tensor, step: Step, res: torch.Tensor) -> None:
    dst.index_add_(0, idx, res if step.pos is None else res.index_select(0, step.pos))


def _product(buf: torch.Tensor, weight: torch.Tensor, step: Step, transpose: bool) -> torch.Tensor:
    """``buf @ weight[o]`` (``weight[o].T`` when ``transpose``) per piece of the step."""
    g, r = len(step.offsets), step.rows
    w = weight.index_select(0, step.offsets_tensor)
    w = w.transpose(1, 2) if transpose else w
    return (buf.view(g, r, -1) @ w).view(g * r, -1)


def forward(feats: torch.Tensor, weight: torch.Tensor, plan: Plan) -> torch.Tensor:
    out = feats @ weight[plan.identity] if plan.identity is not None else feats.new_zeros(
        (plan.num_out, weight.shape[2]))
    buf = feats.new_empty((plan.max_rows, feats.shape[1]))
    for step in plan.steps:
        gathered = _gather(feats, step.in_idx, step, buf[:len(step.offsets) * step.rows])
        _scatter(out, step.out_idx, step, _product(gathered, weight, step, False))
    return out


def backward(feats: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, plan: Plan):
    """Input and weight gradients, sharing the gathered output gradients."""
    grad_feats = grad @ weight[plan.identity].t() if plan.identity is not None else grad.new_zeros(feats.shape)
    grad_weight = torch.zeros_like(weight)
    if plan.identity is not None:
        grad_weight[plan.identity] = feats.t() @ grad
    gbuf, fbuf = grad.new_empty((plan.max_rows, grad.shape[1])), feats.new_empty((plan.max_rows, feats.shape[1]))
    for step in plan.steps:
        g, r = len(step.offsets), step.rows
        gb = _gather(grad, step.out_idx, step, gbuf[:g * r])
        fb = _gather(feats, step.in_idx, step, fbuf[:g * r])
        part = fb.view(g, r, -1).transpose(1, 2) @ gb.view(g, r, -1)
        grad_weight.index_add_(0, step.offsets_tensor, part)
        _scatter(grad_feats, step.in_idx, step, _product(gb, weight, step, True))
    return grad_feats, grad_weight


class GroupedConv(torch.autograd.Function):
    """``GroupedConv.apply(feats, weight, plan)``: the conv without bias, with autograd."""

    @staticmethod
    def forward(ctx, feats, weight, plan):
        ctx.plan = plan
        ctx.save_for_backward(feats, weight)
        return forward(feats.contiguous(), weight.contiguous(), plan)

    @staticmethod
    def backward(ctx, grad):
        feats, weight = ctx.saved_tensors
        grad_feats, grad_weight = backward(feats.contiguous(), weight.contiguous(), grad.contiguous(), ctx.plan)
        return grad_feats, grad_weight, None
