"""SPVCNN-style point-voxel network: MinkUNet's voxel encoder-decoder plus a
point branch. Point features are read from the voxels by trilinear
devoxelisation four times (after the stem, at the bottleneck, after the
second decoder stage and at the end: voxel strides 1, 16, 4 and 1), refined
by per-point MLPs that skip the voxel path, and averaged back into the
voxels (``point_to_voxel``) after the bottleneck and the second decoder
stage; the classifier runs on points, so two points of one voxel can get
different classes. Not weight-compatible with SPVNAS's SPVCNN (TorchSparse),
whose first stage runs on the stem's point features voxelised again and whose
trilinear reads anchor a voxel's value at its lower corner (ours: its
centre)."""

from __future__ import annotations

import torch
from torch import nn

from .. import coords as _coords
from ..nn import functional as _F
from ..nn._hooks import SparseBackwardHooks
from ..tensor import SparseTensor, check_float_dtype
from ..voxelize import _devoxelize
from .minkunet import MinkUNet, _blocks, check_arguments, check_parameters, unet_parameters


def _check_devices(device: torch.device, where: str, tensors: dict, hint: str = "") -> None:
    """A ValueError naming the first of ``tensors`` (its words -> the tensor:
    ``{"rows is": rows}``) on another device than ``device``, that of
    ``where`` ("the tensor"), and both devices, then ``hint`` where given:
    ``"rows is on meta but the tensor on cpu: give ..."``."""
    for said, t in tensors.items():
        if t.device != device:
            raise ValueError(f"{said} on {t.device} but {where} on {device}" + (f": {hint}" if hint else ""))


def point_rows(tensor: SparseTensor, point_coords: torch.Tensor) -> torch.Tensor:
    """Row of ``tensor`` holding each point, from the points' stride-1 voxel
    coords ``(N, 4)``: ``floor(c / stride) * stride`` looked up exactly.
    ``point_coords`` must be int32 ``(N, 4)`` ``[batch, x, y, z]`` as the
    tensor's coords are, on the tensor's device (TypeError / ValueError
    naming it)."""
    if not isinstance(tensor, SparseTensor):
        raise TypeError(f"tensor must be a SparseTensor; got {type(tensor).__name__}")
    if not isinstance(point_coords, torch.Tensor) or point_coords.dtype != torch.int32:
        got = point_coords.dtype if isinstance(point_coords, torch.Tensor) else type(point_coords).__name__
        raise TypeError(f"point_coords must be int32 (batch, x, y, z) voxel coords; got {got}")
    if point_coords.dim() != 2 or point_coords.shape[1] != 4:  # ((N, 3) stopped in torch's broadcast below)
        raise ValueError(f"point_coords must be (N, 4) (batch, x, y, z); got shape {tuple(point_coords.shape)}")
    # (else torch's searchsorted RuntimeError below)
    _check_devices(tensor.device, "the tensor", {"point_coords is": point_coords})
    if torch.compiler.is_compiling():  # a graph of torch.compile / torch.export: this function as an operator
        return torch.ops.pointsparse.voxel_rows(tensor.coords, list(tensor.stride), point_coords)
    st = torch.tensor(tensor.stride, dtype=torch.int32, device=point_coords.device)
    coarse = torch.cat([point_coords[:, :1], torch.div(point_coords[:, 1:], st, rounding_mode="floor") * st], 1)
    layout = _coords.KeyLayout.of(coarse, tensor.coords)
    keys = _coords.pack_torch(coarse, layout)
    table, rows = torch.sort(_coords.pack_torch(tensor.coords, layout))
    pos = torch.searchsorted(table, keys).clamp_max(max(len(table) - 1, 0))
    if len(keys) and (not len(table) or not bool((table[pos] == keys).all())):  # (no voxels: no row holds any)
        if getattr(tensor.cache, "kept", None):  # (the voxels are a VoxelPrune's selection, or come from one)
            raise ValueError(
                f"some points fall in no voxel of the tensor at stride {tensor.stride}: a VoxelPrune before it "
                "dropped every voxel around them. SPVCNN averages every point into the voxels after its bottleneck "
                "and after its second decoder stage (stride 4), so voxels may be pruned only after the bottleneck "
                "(on the input of unet.up.0, unet.fuse.0, unet.up.1: strides 16 and 8, from which the decoder comes "
                "back to every stride-4 voxel; or of unet.up.2, unet.fuse.2, unet.up.3, unet.fuse.3); elsewhere "
                "keep every voxel with a VoxelSkip (models.add_voxel_skip)")
        raise ValueError("some points fall in no voxel of the tensor (points and voxels from different inputs?)")
    return rows[pos]


def point_to_voxel(tensor: SparseTensor, point_feats: torch.Tensor, rows: torch.Tensor) -> SparseTensor:
    """``tensor`` with feats = mean of the point features of each voxel
    (voxels without a point keep zeros). ``point_feats`` ``(N, C)`` float,
    ``rows`` ``(N,)`` the row of ``tensor`` of each point, both on
    ``tensor``'s device (TypeError / ValueError naming them)."""
    if not isinstance(tensor, SparseTensor):
        raise TypeError(f"tensor must be a SparseTensor; got {type(tensor).__name__}")
    if not isinstance(point_feats, torch.Tensor):
        raise TypeError(f"point_feats must be a tensor (N, C); got {type(point_feats).__name__}")
    check_float_dtype(point_feats, "point_feats")  # (integer feats were averaged into float32 silently)
    if point_feats.dim() != 2:
        raise ValueError(f"point_feats must be (N, C); got {tuple(point_feats.shape)}")
    if not isinstance(rows, torch.Tensor) or rows.is_floating_point() or rows.is_complex() or rows.dtype == torch.bool:
        got = f"dtype {rows.dtype}" if isinstance(rows, torch.Tensor) else type(rows).__name__
        raise TypeError(f"rows must be an integer tensor (N,), the row of tensor of each point; got {got}")
    # (else torch's index_add RuntimeError, or the range check's)
    _check_devices(tensor.device, "the tensor", {"point_feats are": point_feats, "rows is": rows},
                   "give point_feats and rows on the tensor's device")
    if rows.dtype not in (torch.int32, torch.int64):  # (index_add's index dtypes; torch has no min of uint16/32/64)
        rows = rows.long()
    if not torch.compiler.is_compiling():  # (sizes and values: symbols in a traced graph)
        voxels = len(tensor)
        if rows.shape != point_feats.shape[:1]:
            raise ValueError(f"rows must be ({point_feats.shape[0]},), a row a point; got {tuple(rows.shape)}")
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= voxels):
            raise ValueError(f"rows must lie in [0, {voxels}) (the rows of tensor); got rows from {int(rows.min())} "
                             f"to {int(rows.max())}")
    return _point_to_voxel(tensor, point_feats, rows)


def _point_to_voxel(tensor: SparseTensor, point_feats: torch.Tensor, rows: torch.Tensor) -> SparseTensor:
    """:func:`point_to_voxel` of checked arguments (SPVCNN's forward: rows
    of :func:`point_rows`, rows of ``tensor`` by construction, not read back
    to the host each forward)."""
    voxels = tensor.coords.shape[0]  # (not len(tensor): in a traced graph the count is a symbol, len() needs an int)
    # points per voxel (index_add, not bincount: its length stays the voxels' in a traced graph); fp16 / bf16
    # feats summed and divided in float32, the mean rounded once (an fp16 count was inf past 65504 points)
    count = rows.new_zeros(voxels).index_add_(0, rows, torch.ones_like(rows))
    return tensor.with_feats(_F._mean_of_rows(point_feats, rows, count))


#: Integers up to this magnitude are all float32 values (its 24-bit significand).
_FLOAT32_EXACT = 2**24


#: The farthest voxel coordinate (in voxel units from the origin) at which float32 points are taken: float32
#: holds a position there to a quarter of a voxel. Past it, points of a scan in UTM coordinates lay up to 2 voxels
#: off, within the check's margin, and 8% of a street's points changed class (a review of stop 77).
FLOAT32_POINTS_REACH = 2**21


def _away(points: torch.Tensor, point_coords: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """``(N, 3)``: whether each point lies more than 2 voxel edges from its
    voxel's ``point_coords`` on each axis (NaN: true). Compared exactly, with no copy of
    the points: against the bounds ``point_coords - 2`` and ``+ 2``, made in
    float32 where it holds them (every voxel's coords, ``coords``, within
    ``2**24 - 2``), else in float64, the points widened inside the comparison.
    float32 points whose voxels reach past :data:`FLOAT32_POINTS_REACH` are
    a ValueError saying what to give."""
    low, high = torch.aminmax(coords)
    reach = max(-int(low), int(high) + 1)
    if points.dtype == torch.float32 and reach > FLOAT32_POINTS_REACH:
        spacing = 2.0 ** (reach.bit_length() - 24)  # (float32's spacing at the farthest coordinate, in voxels)
        raise ValueError(f"points are float32 and their voxels reach {reach} voxel units from the origin, where "
                         f"float32 holds a position only to {spacing:g} voxel (past {FLOAT32_POINTS_REACH}, a "
                         "quarter): give the points as float64, or take the origin near the cloud (subtract the "
                         "coords' minimum from the coords, and from the points in voxel units)")
    wide = points.dtype == torch.float64 or max(-int(low), int(high)) > _FLOAT32_EXACT - 2
    edges = point_coords.to(torch.float64 if wide else torch.float32)
    return ~((points >= edges - 2) & (points <= edges + 2))  # (NaN: away)


def _as_index(t):
    """An integer tensor of another dtype than int32 / int64 as int64 (torch
    reads a uint8 index as a mask, refuses int8 / int16 ones and has no min
    or comparison of uint16 / 32 / 64); anything else as it is."""
    if isinstance(t, torch.Tensor) and not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool) \
            and t.dtype not in (torch.int32, torch.int64):
        return t.long()
    return t


def check_points(voxels: SparseTensor, inverse: torch.Tensor, points: torch.Tensor,
                 point_batch: torch.Tensor, values: bool = True, sixteen_bit: bool = False) -> torch.Tensor | None:
    """SPVCNN's point arguments checked against ``voxels`` (``TypeError`` /
    ``ValueError`` naming them, and one on another device than ``voxels``;
    ``inverse``'s rows, ``point_batch`` and the points' positions against
    the voxels too: :func:`checked_point_coords`, in a traced graph as its
    operator; ``values=False``: the types and shapes only, None returned);
    returns the points' voxel coords ``voxels.coords[inverse]``. 16-bit
    points are a TypeError unless ``sixteen_bit`` (a program exported before
    stop 75 that takes them)."""
    if not isinstance(points, torch.Tensor) or not points.is_floating_point():
        got = f"dtype {points.dtype}" if isinstance(points, torch.Tensor) else type(points).__name__
        raise TypeError(f"points must be a float tensor (N, 3); got {got}")
    if points.dtype in (torch.float16, torch.bfloat16) and not sixteen_bit:  # (cast with a bf16 model's inputs: 70-78% of the points
        # of a sweep then lay outside their own voxel, within the check's margin, and the logits moved 10-26x more)
        raise TypeError(f"points must be float32 or float64; got {points.dtype}, whose 8 or 11 bits place a point "
                        "past 256 or 2048 voxels from the origin a voxel or more off (a bf16 or fp16 model takes "
                        "float32 points)")
    for name, t in (("inverse", inverse), ("point_batch", point_batch)):
        if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            got = f"dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name} must be an integer tensor (N,); got {got}")
    # (else torch's RuntimeError from the indexing or comparisons below)
    _check_devices(voxels.device, "the voxels",
                   {"points are": points, "inverse is": inverse, "point_batch is": point_batch},
                   "give points, inverse and point_batch on the voxels' device")
    inverse, point_batch = _as_index(inverse), _as_index(point_batch)
    if points.dim() != 2 or points.shape[1] != 3 or inverse.shape != (points.shape[0],) \
            or point_batch.shape != (points.shape[0],):
        raise ValueError(f"points must be (N, 3), inverse and point_batch (N,); got {tuple(points.shape)}, "
                         f"{tuple(inverse.shape)}, {tuple(point_batch.shape)}")
    if not values:  # (a caller whose program checks them: an exported program's own operator)
        return None
    if torch.compiler.is_compiling():  # (the same checks, as an operator: they run when the graph runs)
        return torch.ops.pointsparse.point_coords(voxels.coords, inverse, points, point_batch)
    return checked_point_coords(voxels.coords, inverse, points, point_batch)


def checked_point_coords(coords: torch.Tensor, inverse: torch.Tensor, points: torch.Tensor,
                         point_batch: torch.Tensor) -> torch.Tensor:
    """``coords[inverse]``, the voxel coords of each point, once ``inverse``
    holds rows of ``coords``, each point lies in its voxel and
    ``point_batch`` is its voxel's batch (a ValueError naming the first that
    does not): :func:`check_points`'s checks of the values, eager or as the
    operator ``pointsparse::point_coords`` in a graph (an exported SPVCNN
    ran a -1 inverse, points in metres or another batch's index silently).
    The shapes and dtypes are :func:`check_points`'."""
    if len(inverse) and (int(inverse.min()) < 0 or int(inverse.max()) >= len(coords)):
        raise ValueError(f"inverse holds rows outside [0, {len(coords)}) (the voxel row of each point)")
    point_coords = coords[inverse]
    if len(inverse):
        # Points in voxel units lie in their voxel (floor(points) its coords; a float32 rounding may
        # reach the next one): points in metres, or in other units, read other voxels silently.
        away = _away(points, point_coords[:, 1:], coords[:, 1:])
        if bool(away.any()):
            i = int(away.any(1).nonzero()[0, 0])
            if not bool(points[i].isfinite().all()):
                raise ValueError(f"points[{i}] = {points[i].tolist()} is not finite: points must be positions in "
                                 "voxel units (points / voxel_size)")
            raise ValueError(f"points[{i}] = {points[i].tolist()} lies outside its voxel "
                             f"{point_coords[i, 1:].tolist()}: points must be positions in voxel units "
                             "(points / voxel_size, whose floor is the voxel's coords)")
        wrong = point_batch != point_coords[:, 0]
        if bool(wrong.any()):
            i = int(wrong.nonzero()[0, 0])
            raise ValueError(f"point_batch[{i}] = {int(point_batch[i])} but point {i} lies in a voxel of batch "
                             f"{int(point_coords[i, 0])}: point_batch must be the voxels' batch index of each "
                             "point (voxels.coords[inverse, 0])")
    return point_coords


def _weight_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype of a linear layer's weight: its tensor's, ``weight_orig``'s
    where a pruning mask re-parametrises it (``weight`` is then the hook's
    product of the last forward, which ``.to(dtype)`` does not convert), or
    the sparse format's of a compressed one (formats.SparseLinear holds no
    ``weight``)."""
    weight = layer._parameters.get("weight_orig", getattr(layer, "weight", None))
    return weight.dtype if isinstance(weight, torch.Tensor) else layer.weight_format.dtype


def _point_mlp(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, cout), nn.BatchNorm1d(cout), nn.ReLU(inplace=True))


class SPVCNN(SparseBackwardHooks, nn.Module):
    """Point-voxel U-Net (same widths and ``cr`` as :class:`MinkUNet`, and
    the same limit on its parameter values in all, checked before building).

    ``forward(voxels, inverse, points, point_batch)``: ``voxels`` the
    stride-1 SparseTensor of the cloud(s), ``inverse`` ``(N,)`` the voxel row
    of each point, ``points`` ``(N, 3)`` point positions in voxel units (the
    coords of the voxels are ``floor(points)``), ``point_batch`` ``(N,)`` the
    batch index of each point. Returns per-point logits ``(N, num_classes)``
    in the point branch's dtype. The bf16 inference form
    (``pointsparse eval --inference bf16``: :meth:`to_bf16_inference` after
    ``nn.fuse_for_inference``) runs the voxel branch in bfloat16 (voxels'
    feats bfloat16) and the point branch in float32. ``widths``: the stage
    widths it was built with, as :class:`MinkUNet`'s (a channel cut narrows
    layers, not this record).
    """

    def __init__(self, in_channels: int, num_classes: int, cr: float = 1.0, blocks: int = 2):
        super().__init__()
        args = check_arguments(in_channels, num_classes, cr, blocks)
        w = args[4]
        # each point MLP: Linear (weight, bias) + BatchNorm1d (weight, bias)
        mlps = sum(cin * cout + 3 * cout for cin, cout in ((w[0], w[4]), (w[4], w[6]), (w[6], w[8])))
        check_parameters(type(self).__name__, unet_parameters(args[0], w, args[3]) + mlps + (w[8] + 1) * args[1],
                         *args[:4])
        self.unet = MinkUNet(*args[:4])
        self.unet.classifier = nn.Identity()  # the classifier runs on points
        w = self.unet.widths
        self.in_channels, self.num_classes, self.cr = self.unet.in_channels, self.unet.num_classes, self.unet.cr
        self.widths = w
        self.point_mlps = nn.ModuleList([_point_mlp(w[0], w[4]), _point_mlp(w[4], w[6]), _point_mlp(w[6], w[8])])
        self.dropout = nn.Dropout(0.3)
        self.classifier = nn.Linear(w[8], self.num_classes)

    def forward(self, voxels: SparseTensor, inverse: torch.Tensor, points: torch.Tensor,
                point_batch: torch.Tensor) -> torch.Tensor:
        if not isinstance(voxels, SparseTensor):
            raise TypeError(f"SPVCNN takes a SparseTensor; got {type(voxels).__name__}")
        if voxels.num_channels != self.in_channels:
            raise ValueError(f"SPVCNN was built for {self.in_channels} input channels; got {voxels.num_channels}")
        if voxels.stride != (1, 1, 1):  # (the U-Net's own forward, which checks it, is not run)
            raise ValueError(f"SPVCNN needs a stride-1 input tensor (voxels); got stride {voxels.stride}")
        inverse, point_batch = _as_index(inverse), _as_index(point_batch)  # (any integer dtype, as rows are taken)
        point_coords = check_points(voxels, inverse, points, point_batch)
        if not torch.compiler.is_compiling() and points.shape[0] == 1 and any(
                isinstance(m, nn.BatchNorm1d) and (m.training or not m.track_running_stats)
                for m in self.point_mlps.modules()):  # (torch's error named no argument)
            from ..nn.modules import BatchStatisticsError
            raise BatchStatisticsError("SPVCNN in training mode got 1 point: its point MLPs' BatchNorm1d normalise "
                                       "with the batch's statistics, and one value per channel has no variance; "
                                       "give at least 2 points (points, inverse, point_batch), or call eval()")
        u = self.unet
        # The point branch runs in its own weights' dtype, the voxel branch in
        # the voxels' (one dtype for both but in the bf16 inference form, whose
        # convs run bfloat16 and its point branch float32): the voxels' feats
        # widen exactly into the interpolation, the points' means round once
        # into the voxels.
        point_dtype, voxel_dtype = _weight_dtype(self.classifier), voxels.feats.dtype

        corners: list = []  # (the stride-1 corners, made for the stem's output, serve the last stage's too)

        def to_points(t: SparseTensor) -> torch.Tensor:
            return _devoxelize(t.with_feats(t.feats.to(point_dtype)), None, points, 1.0, point_batch, "trilinear",
                               corners)

        def to_voxels(t: SparseTensor, z: torch.Tensor) -> SparseTensor:
            y = _point_to_voxel(t, z, point_rows(t, point_coords))
            return y.with_feats(self.dropout(y.feats).to(voxel_dtype))

        x0 = u.stem(voxels)
        z0 = to_points(x0)
        skips = [x0]
        for stage in u.down:
            skips.append(stage(skips[-1]))
        x4 = skips.pop()
        z1 = to_points(x4) + self.point_mlps[0](z0)
        y = to_voxels(x4, z1)
        for i, (up, fuse) in enumerate(zip(u.up, u.fuse)):
            y = up(y)  # (each step's input dies before the next allocates: see minkunet._blocks)
            y = _cat(y, skips.pop())
            for block in _blocks(fuse):
                y = block(y)
            if i == 1:
                z2 = to_points(y) + self.point_mlps[1](z1)
                y = to_voxels(y, z2)
        z3 = to_points(y) + self.point_mlps[2](z2)
        return self.classifier(z3)

    def fuse_point_mlps(self) -> None:
        """In place, for inference (``nn.fuse_for_inference`` calls it on its
        copy): each point MLP's BatchNorm1d folded into its Linear (they see
        ``(N, C)`` rows), where neither runs forward hooks and
        ``nn.fuse.fold_linear_batchnorm`` takes the pair; the BatchNorm
        becomes ``nn.Identity``. A pair it refuses (a Linear subclass, a pruned
        or parametrized Linear, a BatchNorm1d without running statistics)
        stays as it is."""
        from ..nn.fuse import _linear_batchnorm_refusal, fold_linear_batchnorm, has_hooks, has_output_hooks

        for mlp in self.point_mlps:
            linear, bn = mlp[0], mlp[1]
            if _linear_batchnorm_refusal(linear, bn) is None and not has_output_hooks(linear) and not has_hooks(bn):
                fold_linear_batchnorm(linear, bn)
                mlp[1] = nn.Identity()

    def to_bf16_inference(self) -> "SPVCNN":
        """The voxel branch (the U-Net's convs) cast to bfloat16 in place,
        the point branch (MLPs, classifier) left in float32; returns self.
        Call it on ``nn.fuse_for_inference``'s copy, for inference: the
        voxels' feats are then given in bfloat16. The VoxelPrune layers
        ``models.add_voxel_prune`` registered on this model (``voxel_prune``:
        they run on the U-Net's modules, the only ones taking a
        SparseTensor) are cast with it."""
        self.unet.to(torch.bfloat16)
        prunes = self._modules.get("voxel_prune")  # (loading._PRUNES; a learned score's scorer reads bf16 feats)
        if prunes is not None:
            prunes.to(torch.bfloat16)
        return self


def _cat(a: SparseTensor, b: SparseTensor) -> SparseTensor:
    from ..nn import cat

    return cat([a, b])
