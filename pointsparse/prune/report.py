"""Sparsity and cost report: per prunable layer (Linear, torch ConvNd, sparse
conv) its weight shape, parameters, nonzeros, sparsity and FLOPs, as a dict
and as a printed table, optionally next to an earlier report ("before").

FLOPs count multiply-adds as 2 operations and ignore the bias:

* ``Linear``: ``2 * rows * nnz(W)``, ``rows`` = input rows (all leading dims);
* ``ConvNd``: ``2 * N * prod(output spatial) * nnz(W)`` (each weight entry
  meets one input value per output position; padding zeros are counted);
  ``ConvTransposeNd``: the same with the input's spatial size;
* sparse conv: ``2 * sum_o pairs(o) * nnz(W[o])`` where ``pairs(o)`` is the
  number of (input, output) site pairs of kernel offset ``o`` in the kernel
  map of the example input, and ``nnz(W[o])`` counts the nonzeros of that
  offset's ``(C_in, C_out)`` matrix (a pruned offset costs nothing). With a
  ``kernel_region`` only its offsets count: the offsets outside it are no
  weights of the layer (the conv never runs them), whatever values are
  loaded there (a compressed conv keeps its source's region).

``params``, ``nonzeros``, ``weight_nonzeros`` and ``sparsity`` count the
weight entries that are weights of the layer (``params`` and ``nonzeros``
with the bias): all of them, except in a sparse conv with a
``kernel_region``, where only the region's offsets count (the values loaded
outside it are never run, as for its FLOPs); ``shape`` is the weight
tensor's. The total's sparsity is over the weights every row counts.

Tied weights (layers sharing one stored tensor, ``b.weight = a.weight``):
each layer's row lists the weight as its own, but the total's ``params``,
``nonzeros``, ``weight_nonzeros`` and ``sparsity`` count each distinct
tensor once (as ``model.parameters()`` does; a shared bias too), an entry
nonzero while any layer sharing it runs it nonzero (pruning one of two tied
layers leaves the other running the shared ``weight_orig`` unmasked). The
total's FLOPs are the rows' sum: each layer runs the weight.

``dense_flops`` is the same count with every weight entry nonzero.
``executed_flops`` is what the engine runs: for a sparse conv the fused
engine's choice (``execution``: "dense", "offsets" when all-zero kernel
offsets and offsets outside a ``kernel_region`` are skipped, "vector" when
only the nonzero (offset, input channel, column panel) vectors run, "tiles"
when a bfloat16 conv runs dense on the AMX tiles; see
``pointsparse.nn.functional.engine_cost``), or where the call ran on the
pure-torch path instead (``pointsparse.backend("torch")``, a device other
than the CPU) ``execution`` "torch", every
pair of every offset times the whole ``(C_in, C_out)`` matrix (all-zero
offsets and offsets outside a ``kernel_region`` too; on another device,
where its columns fit, one product over ``K`` columns per output site:
``pointsparse.nn.reference.torch_flops``); torch layers run dense
(``execution`` "dense", ``executed_flops == dense_flops``). A layer
called several times in the forward sums its calls' FLOPs, and its
``execution`` is its calls' label where they agree, else their distinct
labels in call order joined by "+" (``"offsets+torch"``). Without an
example input FLOPs are ``None``. Per-offset pair counts come from the kernel
map the forward used (``pointsparse.kmap.get_kmap`` on the layer's input,
whose ``sizes`` are the counts); ``pairs={layer_name: counts}`` overrides them
(and gives FLOPs without running the model: then executed as a conv3d
call in inference on the CPU would run them, the engine's kernels or,
under ``backend("torch")``, the torch path's sum). The given counts are one call's
(one kernel map's): with an example input they replace the counts of every
call of the layer, so a conv run twice in the forward counts them twice, as
it counts its own maps; without one, the layer's FLOPs are one call's. To
count calls on different maps, leave the layer out of ``pairs``.

Compressed layers (``pointsparse.formats.SparseLinear`` and
``SparseConv3d``, from ``formats.compress``) have rows too, counted on the
dense weight their format holds (``shape``, ``params``, ``nonzeros``,
``sparsity``, ``flops`` and ``dense_flops`` as the uncompressed masked layer's,
so a compressed model's totals of these equal its source's) and executed
as they run: ``SparseConv3d`` with ``execution="engine"`` as the engine runs
its ``engine_weight`` (the engine's choice, as above), ``SparseLinear`` with
``execution="dense"`` dense (torch's linear); the format's own
product (``execution`` ``"format:<name>"``, e.g. ``"format:CSR"``) does one
multiply-add per stored value (padding zeros a format stores included: BSR
blocks, N:M groups, EIE runs) per input row (``SparseLinear``), per pair of
the offset (per-offset formats) or per output site (FKW, whose im2col panel
holds every offset of each output site; ``None`` given ``pairs`` alone, which
do not tell the output sites)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import torch
from torch import nn

from . import adapters
from ._builtins import _sparse_flops, _sparse_used_weights
from .._modes import evaluating, run_model
from .adapters import is_sparse_conv, weight_now


def _layer_flops(module, weight, inputs, output, pair_counts):
    """``(flops, dense_flops, executed_flops, execution)`` of one call, from
    the layer's adapter (a compressed layer's from :func:`_compressed_flops`)."""
    if _is_compressed(module):
        return _compressed_flops(module, weight, inputs, output, pair_counts)
    return adapters.adapter_for(module).flops(module, weight, inputs, output, pair_counts)


def _compressed_types() -> tuple:
    from ..formats import SparseConv3d, SparseLinear  # noqa: PLC0415 - formats sits above this package

    return SparseLinear, SparseConv3d


def _is_compressed(module) -> bool:
    """A layer :func:`pointsparse.formats.compress` made (its weight in a format)."""
    return isinstance(module, _compressed_types())


def _is_kernel_mapped(module) -> bool:
    """A sparse conv or a compressed one: its FLOPs come from pair counts."""
    return isinstance(module, _compressed_types()[1]) or (not _is_compressed(module) and is_sparse_conv(module))


def _weight(module) -> torch.Tensor:
    """The weight the layer computes with (with an attached Filter
    Skeleton's scale): a compressed layer's is the dense weight its format
    holds (``(out, in)``; ``(K, C_in, C_out)`` for a conv)."""
    linear, conv = _compressed_types()
    if isinstance(module, linear):
        return module.weight_format.to_dense()
    if isinstance(module, conv):
        return module.engine_weight
    return weight_now(module, "weight")  # (with an attached Filter Skeleton's scale: compress holds it too)


def _has_row(module) -> bool:
    """A prunable layer or a compressed one: a row of the report."""
    return _is_compressed(module) or adapters.is_layer(module)


def counted_layers(model: nn.Module, layers=None) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the layers the report has a row for (prunable
    ones and compressed ones, ``formats.compress``'s), in definition order,
    or of the named ``layers``: :func:`.adapters.prunable_layers` with the
    compressed layers too (the same TypeError / ValueError for a bad name)."""
    compressed = {n: m for n, m in model.named_modules() if _is_compressed(m)} if isinstance(model, nn.Module) else {}
    if not compressed:
        return adapters.prunable_layers(model, layers)
    if layers is None:
        return [(n, m) for n, m in model.named_modules() if _has_row(m)]
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        adapters.prunable_layers(model, layers)  # (its TypeError naming layers)
    layers = list(layers)
    others = [n for n in layers if not (isinstance(n, str) and n in compressed)]
    found = dict(adapters.prunable_layers(model, others)) if others else {}
    if not layers:
        raise ValueError("layers is empty")
    return [(n, compressed[n] if n in compressed else found[n]) for n in layers]


def counted_weights(module: nn.Module) -> torch.Tensor:
    """The weight entries ``module``'s row counts (detached): of the weight
    it runs, those that are weights of the layer (a compressed layer's
    from the dense weight its format holds)."""
    return _used_weights(module, _weight(module).detach())


def _used_weights(module, weight: torch.Tensor) -> torch.Tensor:
    """The entries of ``weight`` that are weights of the layer
    (:func:`.adapters.used_weights`; a compressed conv's: its region's
    offsets, as its source's)."""
    if isinstance(module, _compressed_types()[1]):
        return _sparse_used_weights(module, weight)
    return adapters.used_weights(module, weight)


class _Counted(NamedTuple):
    """One row's tensor for the total: ``stored``, the object it is kept in
    (rows sharing one, tied layers, count it once); ``module`` and ``name``
    (``"weight"`` or ``"bias"``), whose tensor it is; ``run``, the tensor the
    layer computes with (its full shape); ``counted``, the entries its row
    counts."""

    stored: object
    module: nn.Module
    name: str
    run: torch.Tensor
    counted: torch.Tensor


def _stored(module: nn.Module, name: str) -> object:
    """What ``module``'s tensor ``name`` is kept in: the Parameter (or
    buffer), ``name_orig`` for a pruned one, that tied layers share; a
    compressed layer's format is its own (the module stands for it)."""
    if _is_compressed(module):
        return module
    stored = adapters.raw(module, name)
    return module if stored is None else stored


def _count_distinct(items: list[_Counted]) -> tuple[int, int]:
    """``(entries, nonzeros)`` over the distinct stored tensors of ``items``:
    a tensor several rows share (tied layers: ``b.weight = a.weight``)
    counts once. Its entries are those any of the rows counts (a
    ``kernel_region`` conv counts its region's), and an entry is nonzero
    when any of them runs it nonzero: pruning one of two tied layers (or
    pruning them with different masks) leaves the other running the shared
    ``name_orig`` unmasked there, so those values are still weights of the
    model (``prune.remove`` of each then writes the masks' union into the
    one tensor)."""
    groups: dict[int, list[_Counted]] = {}
    for item in items:
        groups.setdefault(id(item.stored), []).append(item)
    entries = nonzeros = 0
    for group in groups.values():
        if len(group) == 1:  # (the row's own count)
            entries += group[0].counted.numel()
            nonzeros += int((group[0].counted != 0).sum())
            continue
        counted = live = None
        for item in group:
            used = adapters.used_entries(item.module, item.name).to(item.run.device)
            alive = used & (item.run != 0)
            counted = used if counted is None else counted | used
            live = alive if live is None else live | alive
        entries += int(counted.sum())
        nonzeros += int(live.sum())
    return entries, nonzeros


def distinct_weight_counts(named: list[tuple[str, nn.Module]]) -> tuple[int, int]:
    """``(entries, nonzeros)`` of the weight entries the rows of the
    ``(name, module)`` layers count (:func:`counted_layers`), each distinct
    stored weight once (tied layers share one): the report's total."""
    items = []
    for _, module in named:
        run = _weight(module).detach()
        items.append(_Counted(_stored(module, "weight"), module, "weight", run, _used_weights(module, run)))
    return _count_distinct(items)


def _stored_values(fmt) -> int:
    """Values a format stores (padding zeros included): what its product multiplies."""
    from ..formats import FKW  # noqa: PLC0415

    return (fmt.weight if isinstance(fmt, FKW) else fmt.values).numel()


def _compressed_flops(module, weight, inputs, output, pair_counts):
    """A compressed layer's counts (see the module docstring)."""
    from ..formats import FKW  # noqa: PLC0415

    linear, _ = _compressed_types()
    weight = weight.detach()
    if isinstance(module, linear):
        rows = math.prod(inputs[0].shape[:-1])  # (..., in_features) (numel // in_features: a Linear(0, out))
        flops, dense, _, _ = adapters.positions_flops(rows, weight)
        if module.execution == "dense":  # (torch's linear on the weight the format holds)
            return flops, dense, dense, "dense"
        executed = 2 * rows * _stored_values(module.weight_format)
        return flops, dense, executed, f"format:{type(module.weight_format).__name__}"
    # The counts of the source conv (the region's offsets only), from the dense weight the format holds.
    flops, dense, executed, execution = _sparse_flops(module, weight, inputs, output, pair_counts)
    if module.execution == "engine":
        return flops, dense, executed, execution
    keep = module._region_mask()
    counts = pair_counts if keep is None else pair_counts * keep.to(pair_counts.dtype)
    if isinstance(module.offsets, FKW):
        executed = None if output is None else 2 * int(output.feats.shape[0]) * _stored_values(module.offsets)
    else:
        stored = torch.tensor([_stored_values(f) for f in module.offsets], dtype=torch.int64)
        executed = 2 * int((counts * stored).sum())  # (offsets outside the region are not run)
    return flops, dense, executed, f"format:{module.format_name}"


def sparsity_report(model: nn.Module, example_input=None, pairs: dict | None = None) -> dict:
    """The report of ``model`` now: ``{"layers": {name: row}, "total": row}``
    with ``row`` holding ``type, shape, params, nonzeros, weight_nonzeros,
    sparsity, flops, dense_flops, executed_flops, execution``, one row per
    prunable layer and per compressed layer (``formats.SparseLinear`` /
    ``SparseConv3d``: counted on the dense weight its format holds, executed
    as it runs, through the engine or the format's product; see the module
    docstring). ``example_input`` (a tensor, a
    SparseTensor, or a tuple of forward arguments) is run once in eval mode
    and without gradients to count FLOPs (a layer called several times adds
    up its calls, and its ``execution`` is theirs where they agree, else
    each distinct one in call order joined by "+", e.g. ``"offsets+torch"``
    for a call on the engine and one on the pure-torch path); ``pairs`` maps a sparse conv's (or a compressed
    ``SparseConv3d``'s) qualified name to one call's per-offset pair counts
    (shape ``(K,)``), used for each of its calls. ``total`` counts each
    distinct weight tensor once: layers sharing one (tied weights) each list
    it in their row, the total's counts hold it once (see the module
    docstring). The weights may be on any device that holds values (not
    ``meta``: a ValueError)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    layers, weights, biases = {}, [], []
    modules = {name: m for name, m in model.named_modules() if _has_row(m)}
    pairs = _check_pairs(pairs, modules)
    for qualified, module in modules.items():
        weight = _weight(module).detach()
        bias = getattr(module, "bias", None)
        bias = bias.detach() if isinstance(bias, torch.Tensor) else None
        _check_has_values(qualified, weight, bias)
        used = _used_weights(module, weight)
        weight_nonzeros = int((used != 0).sum())
        weights.append(_Counted(_stored(module, "weight"), module, "weight", weight, used))
        if bias is not None:
            biases.append(_Counted(_stored(module, "bias"), module, "bias", bias, bias))
        layers[qualified] = {
            "type": type(module).__name__,
            "shape": tuple(weight.shape),
            "params": used.numel() + (bias.numel() if bias is not None else 0),
            "nonzeros": weight_nonzeros + (int((bias != 0).sum()) if bias is not None else 0),
            "weight_nonzeros": weight_nonzeros,
            "sparsity": 1.0 - weight_nonzeros / used.numel() if used.numel() else 0.0,
            "flops": None,
            "dense_flops": None,
            "executed_flops": None,
            "execution": None,
        }
    if example_input is not None:
        _count_flops(model, modules, layers, example_input, pairs)
    else:
        for qualified, counts in pairs.items():
            module = modules[qualified]
            flops = _layer_flops(module, _weight(module), None, None, counts)
            _set_flops(layers[qualified], flops)
    return {"layers": layers, "total": _total(layers, _count_distinct(weights), _count_distinct(biases))}


def _check_has_values(qualified: str, weight: torch.Tensor, bias) -> None:
    """The report counts nonzeros: a tensor on the meta device has a shape
    but no values to count (on any other device they are counted there)."""
    for label, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and tensor.is_meta:
            raise ValueError(
                f"layer {qualified or '(model)'!r} has its {label} on the meta device (a shape without values); "
                f"sparsity_report counts nonzeros, so the model's weights must hold values (materialize or load "
                f"them first)"
            )


def _check_pairs(pairs, modules: dict) -> dict:
    """``pairs`` as ``{name: int64 (K,) counts}``, every name a sparse conv of
    the model and every count vector one entry per kernel offset; checked
    whether or not an example input is given."""
    if pairs is None:
        return {}
    if not isinstance(pairs, Mapping):
        raise TypeError(f"pairs must be a dict {{layer name: per-offset pair counts}}; got {type(pairs).__name__}")
    checked = {}
    for qualified, counts in pairs.items():
        if qualified not in modules or not _is_kernel_mapped(modules[qualified]):
            raise ValueError(f"pairs names {qualified!r}, which is not a sparse conv of the model")
        counts = _as_counts(counts)
        offsets = _weight(modules[qualified]).shape[0]
        if counts.shape != (offsets,):
            raise ValueError(
                f"pairs for a sparse conv with {offsets} offsets must have shape ({offsets},); "
                f"got {tuple(counts.shape)}"
            )
        checked[qualified] = counts
    return checked


def _as_counts(counts) -> torch.Tensor:
    try:
        counts = torch.as_tensor(counts)
    except (TypeError, ValueError, RuntimeError):  # (a str: torch's "new(): invalid data type 'str'")
        raise TypeError(f"pair counts must be a 1-D integer sequence; got {type(counts).__name__}") from None
    if counts.dtype.is_floating_point or counts.dtype == torch.bool or counts.dim() != 1:
        raise ValueError(f"pair counts must be a 1-D integer sequence; got {counts!r}")
    counts = counts.to(torch.int64).cpu()
    if (counts < 0).any():
        raise ValueError(f"pair counts must be >= 0; got {counts.tolist()}")
    return counts


def _pair_counts(module, sparse_input) -> torch.Tensor:
    """Per-offset pair counts of the map the layer's forward just used (from
    the input's coordinate cache; for a transposed conv, the transpose of the
    strided map it mirrors, so the same counts)."""
    if _is_compressed(module):
        from ..kmap import get_kmap  # noqa: PLC0415 - the kmap layer sits above this package

        kmap = get_kmap(sparse_input, module.kernel_size, module.stride, module.dilation, module.transposed)
    else:
        kmap = adapters.adapter_for(module).kernel_map(module, sparse_input)
    return kmap.sizes.to(torch.int64).cpu()


def _count_flops(model, modules, layers, example_input, pairs):
    """Run ``example_input`` through ``model`` and fill each layer's FLOPs:
    its calls' counts summed, its ``execution`` each distinct one of its
    calls ran, in call order, joined by "+" (a row holding the sum of a
    dense call and an offset-skipping one labelled with the last call's
    alone told half of it)."""
    handles, executions = [], {}

    def hook_for(qualified, module):
        def hook(mod, inputs, output):
            weight = _weight(mod) if _is_compressed(mod) else getattr(mod, "weight")
            if _is_kernel_mapped(mod):
                counts = pairs[qualified] if qualified in pairs else _pair_counts(mod, inputs[0])
            else:
                counts = None
            flops = _layer_flops(mod, weight, inputs, output, counts)
            _set_flops(layers[qualified], flops, add=True)
            executions.setdefault(qualified, {})[flops[3]] = None  # (a dict: distinct, in call order)

        return hook

    for qualified, module in modules.items():
        handles.append(module.register_forward_hook(hook_for(qualified, module)))
    try:
        with evaluating(model), torch.no_grad():
            run_model(model, example_input)
    finally:
        for handle in handles:
            handle.remove()
    for qualified, row in layers.items():
        if row["flops"] is None:  # the layer did not run on this input
            row["flops"], row["dense_flops"], row["executed_flops"] = 0, 0, 0
        else:
            row["execution"] = "+".join(executions[qualified])


def _set_flops(row: dict, counts: tuple, add: bool = False) -> None:
    """Store (or, ``add``, accumulate over calls) one call's counts."""
    for key, value in zip(("flops", "dense_flops", "executed_flops"), counts[:3]):
        row[key] = (row[key] or 0) + value if add else value
    row["execution"] = counts[3]


def _total(layers: dict, weights: tuple[int, int], biases: tuple[int, int]) -> dict:
    """The total row: ``weights`` and ``biases``, ``(entries, nonzeros)`` of
    the distinct tensors the rows count (:func:`_count_distinct`), and the
    sum of the rows' FLOPs."""
    flops = [r["flops"] for r in layers.values()]
    dense = [r["dense_flops"] for r in layers.values()]
    executed = [r["executed_flops"] for r in layers.values()]
    known = bool(flops) and all(f is not None for f in flops)
    executed_known = known and all(e is not None for e in executed)
    return {
        "type": "total",
        "shape": (),
        "params": weights[0] + biases[0],
        "nonzeros": weights[1] + biases[1],
        "weight_nonzeros": weights[1],
        "sparsity": 1.0 - weights[1] / weights[0] if weights[0] else 0.0,
        "flops": sum(flops) if known else None,
        "dense_flops": sum(dense) if known else None,
        "executed_flops": sum(executed) if executed_known else None,
        "execution": None,
    }


def _human(value) -> str:
    if value is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return str(value)


_ROW_KEYS = ("type", "shape", "params", "nonzeros", "sparsity", "flops", "executed_flops")


def _check_report(report, name: str) -> None:
    """``report`` has the form :func:`sparsity_report` returns: ``layers``
    (a dict of rows) and ``total`` (a row), each row holding the table's keys."""
    expected = f"{name} must be what sparsity_report returns ({{'layers': {{name: row}}, 'total': row}})"
    if not isinstance(report, Mapping):
        raise TypeError(f"{expected}; got {type(report).__name__}")
    if not isinstance(report.get("layers"), Mapping) or not isinstance(report.get("total"), Mapping):
        raise TypeError(f"{expected}; got a {type(report).__name__} with keys {sorted(map(str, report))}")
    for layer, row in [*report["layers"].items(), ("total", report["total"])]:
        missing = [key for key in _ROW_KEYS if key not in row] if isinstance(row, Mapping) else list(_ROW_KEYS)
        if missing:
            raise TypeError(f"{expected}; its row {layer!r} lacks {missing}")


def format_report(report: dict, before: dict | None = None) -> str:
    """The report as a text table; with ``before`` (an earlier report of the
    same model) nonzeros, sparsity and FLOPs are shown as ``before -> now``,
    and so are a layer's shape and params where they changed (a channel
    cut: the params it removed, which masks never do). Both must be what
    :func:`sparsity_report` returns (TypeError otherwise)."""
    _check_report(report, "report")
    if before is not None:
        _check_report(before, "before")
    header = ["layer", "type", "shape", "params", "nonzeros", "sparsity", "FLOPs", "executed"]
    rows = []
    names = list(report["layers"]) + ["total"]
    for name in names:
        row = report["total"] if name == "total" else report["layers"][name]
        old = None
        if before is not None:
            old = before["total"] if name == "total" else before["layers"].get(name)

        def pair(key, fmt, changed_only=False):
            now = fmt(row[key])
            if old is None or (changed_only and fmt(old[key]) == now):
                return now
            return f"{fmt(old[key])} -> {now}"

        rows.append([
            name or "(model)",
            row["type"],
            pair("shape", lambda shape: "x".join(map(str, shape)) or "-", changed_only=True),
            pair("params", _human, changed_only=True),
            pair("nonzeros", _human),
            pair("sparsity", lambda s: f"{100 * s:.1f}%"),
            pair("flops", _human),
            pair("executed_flops", _human) + (f" ({row['execution']})" if row.get("execution") else ""),
        ])
    widths = [max(len(str(r[c])) for r in rows + [header]) for c in range(len(header))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    out = [line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in rows[:-1]]
    out += [line(["-" * w for w in widths]), line(rows[-1])]
    return "\n".join(out)


def print_report(model: nn.Module, example_input=None, pairs=None, before: dict | None = None) -> dict:
    """Build, print and return the report of ``model``."""
    report = sparsity_report(model, example_input, pairs)
    print(format_report(report, before))
    return report
