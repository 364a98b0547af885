"""What every sparse weight format shares: input checks, the matmul plumbing
(C++ kernel on CPU float32/float64, a pure-torch path elsewhere with the same
result), construction from a pruned module, and storage accounting."""

from __future__ import annotations

import contextlib
import math

import torch

from .. import _ext
from ..coords import check_has_data
from ..tensor import FEATS_DTYPES, as_int
from ._storage import array_nbytes, widen

_KERNEL_DTYPES = _ext.FLOAT_DTYPES
_STORED_INDEX_DTYPES = (torch.uint8, torch.uint16, torch.uint32, torch.uint64)
_WIDE_UNSIGNED = _STORED_INDEX_DTYPES[1:]
#: The dtypes a format stores its values in (and multiplies), a SparseTensor's
#: feats': float8 types pass ``is_floating_point`` and fail inside torch's ops.
VALUE_DTYPES = FEATS_DTYPES


def check_value_dtype(tensor: torch.Tensor, name: str) -> None:
    """TypeError naming ``name`` unless ``tensor`` holds one of :data:`VALUE_DTYPES`."""
    if tensor.dtype not in VALUE_DTYPES:
        raise TypeError(f"{name} must be a floating tensor of float16, bfloat16, float32 or float64; "
                        f"got {tensor.dtype}")


def check_data(tensor, name: str) -> None:
    """A torch.Tensor with data the formats can read: strided (not a torch
    sparse layout: a TypeError), on a real device (a meta tensor is a
    ValueError, as everywhere else in pointsparse: :func:`check_has_data`);
    any device otherwise (its data is copied to the CPU)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(tensor).__name__}")
    check_has_data(tensor, name)


def check_dense_bytes(nbytes: int, what: str, detail: str = "", after: str = "") -> None:
    """The formats' one size check before an allocation: a ValueError
    ``"{what} needs {nbytes} bytes{detail}, over the N GiB limit{after}"``
    where ``nbytes`` is past :data:`pointsparse.tensor.MAX_DENSE_BYTES`."""
    from ..tensor import MAX_DENSE_BYTES  # noqa: PLC0415 - the formats do not import the tensor layer at load

    if nbytes > MAX_DENSE_BYTES:
        raise ValueError(f"{what} needs {nbytes:,} bytes{detail}, over the {MAX_DENSE_BYTES / 2**30:.0f} GiB "
                         f"limit{after}")


def check_dense_size(tensor: torch.Tensor, name: str) -> None:
    """ValueError naming ``name`` where ``tensor`` as a dense (contiguous)
    tensor needs more than :data:`pointsparse.tensor.MAX_DENSE_BYTES`: an
    expanded (stride 0) tensor holds a few bytes but is materialised by
    ``from_dense``, so its size is checked before that copy."""
    check_dense_bytes(tensor.numel() * tensor.element_size(), f"{name} of shape {tuple(tensor.shape)} ({tensor.dtype})",
                      " as a dense tensor", " (from_dense reads every entry)")


_SPARSE_LAYOUTS = (torch.sparse_coo, torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc)


def _sparse_matrix(tensor) -> torch.Tensor | None:
    """``tensor`` on the CPU where it is a 2-D torch sparse matrix of a
    value dtype (no batch or dense dimensions), None where it is a strided
    tensor (``from_dense``'s to check), a TypeError / ValueError naming it
    otherwise."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor; got {type(tensor).__name__}")
    if tensor.layout == torch.strided:
        return None
    if tensor.layout not in _SPARSE_LAYOUTS:
        raise TypeError(f"tensor must be strided or of a torch sparse layout ({', '.join(map(str, _SPARSE_LAYOUTS))}); "
                        f"got {tensor.layout}")
    if tensor.device.type == "meta":
        raise ValueError("tensor must hold data: a tensor on the meta device has only its shape")
    if tensor.dim() != 2 or tensor.dense_dim() != 0:
        raise ValueError(f"tensor must be a 2-D sparse matrix (no batch or dense dimensions); got shape "
                         f"{tuple(tensor.shape)} with {tensor.dense_dim()} dense dimensions")
    check_value_dtype(tensor, "tensor")
    tensor = tensor.detach().to("cpu")
    # (torch converts a block layout to no compressed one but through COO, which keeps its stored entries)
    return tensor.to_sparse_coo() if tensor.layout in (torch.sparse_bsr, torch.sparse_bsc) else tensor


def without_beta_warning(make, *args, **kwargs):
    """``make(*args, **kwargs)`` (torch's constructors and converters of its
    compressed sparse layouts, on a format's checked arrays) without torch's
    warning that those layouts are in beta."""
    import warnings  # noqa: PLC0415

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        return make(*args, **kwargs)


def check_matrix(tensor, name: str = "tensor") -> torch.Tensor:
    """A 2-D floating tensor, detached, on the CPU, contiguous (its dense
    size checked first: :func:`check_dense_size`)."""
    check_data(tensor, name)
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, cols); got shape {tuple(tensor.shape)}")
    check_value_dtype(tensor, name)
    check_dense_size(tensor, name)
    return tensor.detach().to("cpu").contiguous()


def check_shape(shape, name: str = "shape", dims: int | None = 2) -> tuple:
    """``shape`` as a tuple of ints >= 0: ``dims`` of them (at least 2 when
    ``dims`` is None)."""
    try:
        sizes = tuple(as_int(s, name) for s in tuple(shape))
    except TypeError:
        raise TypeError(f"{name} must be a tuple of ints; got {shape!r}") from None
    if (len(sizes) != dims if dims is not None else len(sizes) < 2) or any(s < 0 for s in sizes):
        what = f"{dims}" if dims is not None else "at least 2"
        raise ValueError(f"{name} must be {what} sizes >= 0; got {shape!r}")
    return sizes


def index_array(tensor, name: str, dim: int = 1) -> torch.Tensor:
    """An index argument: a ``dim``-D integer tensor of values >= 0, as int64
    on the CPU (checked before it is narrowed: a float would be truncated)."""
    check_data(tensor, name)
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
        raise TypeError(f"{name} must be an integer tensor; got {tensor.dtype}")
    if tensor.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D; got shape {tuple(tensor.shape)}")
    index = tensor.detach().to("cpu", torch.int64)
    if index.numel() and int(index.min()) < 0:  # a uint64 past 2**63 reads negative too
        raise ValueError(f"{name} must be non-negative; got {int(index.min())}")
    return index


def value_array(tensor, name: str, dim: int) -> torch.Tensor:
    """A ``dim``-D floating tensor, detached, on the CPU, contiguous."""
    check_data(tensor, name)
    check_value_dtype(tensor, name)
    if tensor.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D; got shape {tuple(tensor.shape)}")
    return tensor.detach().to("cpu").contiguous()


def check_pointer(ptr: torch.Tensor, name: str, rows: int, rows_name: str, total: int, total_name: str) -> None:
    """``ptr`` (int64, 1-D) has ``rows + 1`` entries, starts at 0, never
    decreases and ends at ``total``, as the C++ kernels require."""
    if ptr.numel() != rows + 1:
        raise ValueError(f"{name} must have {rows_name} + 1 = {rows + 1} entries; got {ptr.numel()}")
    if int(ptr[0]) != 0:
        raise ValueError(f"{name}[0] must be 0; got {int(ptr[0])}")
    down = (ptr.diff() < 0).nonzero()
    if down.numel():
        raise ValueError(f"{name} must be non-decreasing; decreases at {int(down[0]) + 1}")
    if int(ptr[-1]) != total:
        raise ValueError(f"{name}[-1] must equal {total_name} = {total}; got {int(ptr[-1])}")


def check_below(index: torch.Tensor, name: str, bound: int, bound_name: str) -> None:
    """Every entry of ``index`` (int64, >= 0) is below ``bound``."""
    if index.numel() and int(index.max()) >= bound:
        raise ValueError(f"{name} must lie in [0, {bound}) ({bound_name} = {bound}); got {int(index.max())}")


def check_ascending(major: torch.Tensor, minor: torch.Tensor, name: str, what: str) -> None:
    """``minor`` strictly increases within each run of equal ``major``: entries
    sorted, none repeated (a repeat would be summed by the product but
    overwritten by ``to_dense``)."""
    bad = ((major[1:] == major[:-1]) & (minor[1:] <= minor[:-1])).nonzero()
    if bad.numel():
        i = int(bad[0]) + 1
        raise ValueError(f"{name} must be strictly increasing within each {what} (sorted, no repeats); "
                         f"entry {i} ({int(minor[i])}) follows {int(minor[i - 1])} in {what} {int(major[i])}")


def module_weight(module: torch.nn.Module, name: str = "weight") -> torch.Tensor:
    """The effective weight of a (possibly pruned) module: ``name_orig *
    name_mask`` when torch-style pruning is attached, else ``name``; either
    times ``name_skeleton`` where a filter skeleton is attached
    (``prune.attach_filter_skeleton``; after ``prune.remove`` it stays until
    the next forward folds it)."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module; got {type(module).__name__}")
    owner = type(module).__name__
    orig = getattr(module, name + "_orig", None)
    mask = getattr(module, name + "_mask", None)
    if isinstance(orig, torch.Tensor) and isinstance(mask, torch.Tensor):
        check_data(orig, f"{owner}.{name}_orig")
        check_data(mask, f"{owner}.{name}_mask")
        weight = orig * mask
    else:
        weight = getattr(module, name, None)
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f"{owner} has no tensor attribute {name!r}")
        check_data(weight, f"{owner}.{name}")
    skeleton = getattr(module, name + "_skeleton", None)
    if isinstance(skeleton, torch.Tensor):  # (what its pre-hook computes; after prune.remove, until it folds)
        check_data(skeleton, f"{owner}.{name}_skeleton")
        weight = weight * skeleton
    return weight.detach()


def matrix_of_module(module: torch.nn.Module, name: str = "weight") -> torch.Tensor:
    """The (M, K) matrix a module multiplies with: a Linear's weight (out, in);
    other 2-D weights as they are. Sparse Conv3d weights (K_offsets, C_in,
    C_out) have one matrix per offset: use ``compress`` for those; any conv
    weight goes whole into ``FKW.from_module``."""
    weight = module_weight(module, name)
    if weight.dim() != 2:
        raise ValueError(
            f"{type(module).__name__}.{name} has shape {tuple(weight.shape)}; from_module takes "
            "2-D weights (Linear: (out, in)), and FKW.from_module a conv's weight (C_out, C_in, *kernel); "
            "compress turns a pointsparse.nn.Conv3d into a SparseConv3d (one format per kernel offset)"
        )
    return weight


def outside_transforms(operand: torch.Tensor, what: str, instead: str):
    """The context a format product runs its operand in: none outside the
    torch.func transforms; inside one (``grad`` or ``vjp`` of something
    else) on a plain operand, the transforms' dispatch off (else every tensor
    the product makes is wrapped, and its ``.numpy()`` fails). An operand
    the transforms wrap (``vmap``'s batch, a differentiated input, one made
    inside the transform, or one carrying an outer level's tangent, which an
    inner level cannot see) is a RuntimeError naming ``what``: the product
    would drop what the transforms track."""
    if not _ext.in_transform():
        return contextlib.nullcontext()
    if torch._C._functorch.is_functorch_wrapped_tensor(operand):
        raise RuntimeError(f"{what} is inference-only and cannot run on an input a torch.func transform tracks "
                           f"(vmap, grad, jvp, or a tensor made inside one); {instead}")
    return torch._C._DisableFuncTorch()


def torch_spmm(rows, cols, values, dense, M: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch ``S @ dense`` from coordinate triplets, on dense's device;
    into ``out`` (zeros of (M, N), dense's dtype and device) where given."""
    device = dense.device
    rows = rows.to(device)
    cols = cols.to(device)
    values = values.to(device, dense.dtype)
    if out is None:
        out = torch.zeros(M, dense.shape[1], dtype=dense.dtype, device=device)
    # Chunks keep the (entries, N) temporary bounded.
    step = max(1, (1 << 22) // max(1, dense.shape[1]))
    for start in range(0, rows.numel(), step):
        sl = slice(start, start + step)
        out.index_add_(0, rows[sl], values[sl, None] * dense[cols[sl]])
    return out


class SparseFormat:
    """Base of every format. Subclasses set ``shape`` and ``dtype``, list their
    stored arrays in ``arrays()``, and implement ``from_dense``, ``to_dense``,
    ``_triplets`` (row, col, value of every stored entry, for the torch path)
    and ``_kernel`` (the C++ path)."""

    shape: tuple
    dtype: torch.dtype
    #: The attribute holding the stored values (the one floating array).
    _values_name = "values"

    def _with_dtype(self, dtype: torch.dtype) -> "SparseFormat":
        """The format with its values in ``dtype`` (each rounded as the
        dense weight's ``.to(dtype)`` rounds it; the index arrays shared,
        they do not depend on it): what a compressed module's ``.to(dtype)``
        holds. Itself where ``dtype`` is its own."""
        if dtype == self.dtype:
            return self
        converted = type(self).__new__(type(self))
        converted.__dict__.update(self.__dict__)
        setattr(converted, self._values_name, getattr(self, self._values_name).to(dtype))
        converted.dtype = dtype
        return converted

    def _zeros(self, *shape: int) -> torch.Tensor:
        """The zeros ``to_dense`` fills (default: ``self.shape``), after
        checking their size against :data:`pointsparse.tensor.MAX_DENSE_BYTES`
        (a valid format may declare a huge, nearly empty matrix)."""
        shape = shape or tuple(self.shape)
        check_dense_bytes(math.prod(shape) * torch.empty((), dtype=self.dtype).element_size(),
                          f"to_dense of a {type(self).__name__} of shape {tuple(self.shape)}",
                          after=" (use its matmul, which never makes the dense matrix)")
        return torch.zeros(shape, dtype=self.dtype)

    # -- pickling ---------------------------------------------------------
    def __getstate__(self) -> dict:
        """The attributes, with index arrays of 2, 4 or 8 bytes as int64 and
        their dtype aside: plain ``pickle`` of a uint16/32/64 tensor fails in
        torch ('UntypedStorage' has no attribute 'dtype'; ``torch.save`` and
        ``deepcopy`` are fine), so a format with an index past 255 could not
        be pickled (multiprocessing, a pickled module)."""
        state = dict(self.__dict__)
        wide = {}
        for name, value in state.items():
            if isinstance(value, torch.Tensor) and value.dtype in _WIDE_UNSIGNED:
                wide[name] = value.dtype
                state[name] = value.to(torch.int64)
        state["_pickled_unsigned"] = wide
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        for name, dtype in state.pop("_pickled_unsigned", {}).items():
            state[name] = state[name].to(dtype)
        self.__dict__.update(state)

    # -- checks -----------------------------------------------------------
    def validate(self) -> "SparseFormat":
        """Checks that the stored arrays make a matrix of ``shape`` (index
        arrays inside it, pointers that start at 0, never decrease and end at
        the entry count, permutations that are permutations, ...) and
        returns the format; a ValueError or TypeError naming the array
        otherwise. The constructor runs it; a module loading a format runs
        it too (unpickling does not run the constructor)."""
        self._validate()
        return self

    def _validate(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _stored(self, name: str, kind: str, dim: int) -> torch.Tensor:
        """The stored array ``name``, a CPU tensor of ``dim`` dimensions:
        ``kind`` "index" unsigned (as the kernels take it; returned as
        int64), "bytes" uint8 (packed fields), "values" floating."""
        array = getattr(self, name, None)
        what = f"{type(self).__name__}.{name}"
        if not isinstance(array, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor; got {type(array).__name__}")
        if array.layout != torch.strided or array.device.type != "cpu":
            raise TypeError(f"{what} must be a dense CPU tensor; got layout {array.layout} on {array.device}")
        if kind == "index" and array.dtype not in _STORED_INDEX_DTYPES:
            raise TypeError(f"{what} must be stored as an unsigned integer tensor (uint8/16/32/64); "
                            f"got {array.dtype}")
        if kind == "bytes" and array.dtype != torch.uint8:
            raise TypeError(f"{what} must be a uint8 tensor of packed fields; got {array.dtype}")
        if kind == "values":
            check_value_dtype(array, what)
        if array.dim() != dim:
            raise ValueError(f"{what} must be {dim}-D; got shape {tuple(array.shape)}")
        if kind != "index":
            return array
        index = array.to(torch.int64)
        if index.numel() and int(index.min()) < 0:  # a uint64 past 2**63
            raise ValueError(f"{what} holds {int(index.min())} after widening; index values must fit int64")
        return index

    def _check_dtype(self, values: torch.Tensor) -> None:
        if getattr(self, "dtype", None) != values.dtype:
            raise ValueError(f"{type(self).__name__}.dtype must be its values' dtype {values.dtype}; "
                             f"got {getattr(self, 'dtype', None)}")

    # -- construction ---------------------------------------------------
    @classmethod
    def from_dense(cls, tensor, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def from_torch(cls, tensor: torch.Tensor, **kwargs):
        """The format of a 2-D torch tensor's matrix: a sparse one (layouts
        ``sparse_coo``, ``sparse_csr``, ``sparse_csc``, ``sparse_bsr``,
        ``sparse_bsc``, as ``torch.sparse`` makes them, on any device) or a
        dense one (:meth:`from_dense`'s; ``kwargs`` are its options). CSR,
        CSC and COO take a sparse tensor's stored entries as they are
        (explicit zeros kept, as scipy's converters keep them; a COO's
        repeats summed by ``coalesce``) without a dense copy; the other
        formats read the dense matrix (its size checked first, as
        :meth:`from_dense` checks it)."""
        matrix = _sparse_matrix(tensor)
        if matrix is None:
            return cls.from_dense(tensor, **kwargs)
        return cls._from_sparse(matrix, **kwargs)

    @classmethod
    def _from_sparse(cls, matrix: torch.Tensor, **kwargs):
        """:meth:`from_torch` of a checked 2-D sparse CPU ``matrix``: through
        the dense matrix (CSR, CSC and COO: their own arrays)."""
        M, K = matrix.shape
        check_dense_bytes(M * K * matrix.element_size(),
                          f"{cls.__name__}.from_torch of a {M} x {K} {matrix.layout} tensor ({matrix.dtype})",
                          " as the dense matrix it reads")
        return cls.from_dense(matrix.to_dense(), **kwargs)

    def to_torch(self) -> torch.Tensor:
        """The matrix as a torch sparse tensor of its ``shape`` and dtype:
        CSR a ``sparse_csr`` tensor, CSC a ``sparse_csc`` one, the others a
        coalesced ``sparse_coo`` one (entries stored twice summed). CSR,
        CSC, COO and N:M give their stored entries, explicit zeros kept (an
        N:M group's unused places too); BSR, EIE and FKW their nonzeros (not
        a block's or a run's zero fillers); FKW's is its (C_out, C_in * V)
        matrix view. ``to_torch().to_dense()`` equals ``to_dense()`` (FKW's
        reshaped)."""
        rows, cols, values = self._triplets()
        indices = torch.stack([widen(rows), widen(cols)]) if len(values) else torch.zeros(2, 0, dtype=torch.int64)
        return torch.sparse_coo_tensor(indices, values, tuple(self.shape), check_invariants=False).coalesce()

    @property
    def T(self) -> "SparseFormat":
        """The transposed matrix as a format, no dense copy: CSR's is a CSC
        and CSC's a CSR on the same arrays (as scipy's); the others' a COO
        of their stored entries (entries stored twice summed)."""
        from .csr import COO  # noqa: PLC0415 - csr imports this module

        t = self.to_torch().t().coalesce()
        return COO(t.indices()[0], t.indices()[1], t.values(), tuple(t.shape))

    def __rmatmul__(self, dense: torch.Tensor) -> torch.Tensor:
        """``dense @ self`` for dense (N, M) or (M,): ``(self.T @ dense.T).T``
        (:meth:`matmul`'s checks, named as this product), a contiguous
        (N, K) or (K,)."""
        if not isinstance(dense, torch.Tensor):
            return NotImplemented
        check_data(dense, "dense")
        what = f"dense @ {type(self).__name__}"
        if dense.dim() not in (1, 2) or dense.shape[-1] != self.shape[0]:
            raise ValueError(f"dense must be (N, {self.shape[0]}) or ({self.shape[0]},) to multiply a "
                             f"{self.shape[0]} x {self.shape[1]} {type(self).__name__} from the left; got shape "
                             f"{tuple(dense.shape)}")
        if dense.dtype != self.dtype:
            raise TypeError(f"dense must have dtype {self.dtype} like the weight; got {dense.dtype}")
        if _ext.needs_grad(dense):
            raise RuntimeError(f"{what} gives no gradient for dense, which requires one; run it under "
                               "torch.no_grad() or pass dense.detach()")
        if _ext.carries_tangent(dense):
            raise RuntimeError(f"{what} gives no tangent for dense, which carries a forward-mode one "
                               "(torch.func.jvp, torch.autograd.forward_ad); pass a plain tensor")
        out = self.T.matmul(dense.t() if dense.dim() == 2 else dense)
        return out.t().contiguous() if dense.dim() == 2 else out

    @classmethod
    def from_module(cls, module: torch.nn.Module, name: str = "weight", **kwargs):
        """The format of a module's effective (masked) weight; a Linear gives
        its (out, in) matrix."""
        return cls.from_dense(matrix_of_module(module, name), **kwargs)

    # -- storage ----------------------------------------------------------
    def arrays(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def nbytes(self) -> int:
        """Exact storage: values plus every index array as stored (narrowest
        unsigned width; packed fields rounded up to whole bytes per array)."""
        return sum(array_nbytes(t) for t in self.arrays().values())

    def dense_nbytes(self) -> int:
        rows, cols = self.shape[0], self.shape[1]
        return rows * cols * torch.empty((), dtype=self.dtype).element_size()

    @property
    def nnz(self) -> int:
        """The nonzeros of the matrix held: ``(to_dense() != 0).sum()``,
        counted from the stored arrays (the dense matrix is never made: a
        20000 x 20000 COO of 2 entries made its 1.6 GB). Explicit zeros
        stored (a format's padding, an N:M group's unused places) are not
        counted, unlike scipy's ``nnz`` and torch's ``_nnz()``, which count
        stored entries; entries stored twice at one place (Block-ELL's
        padding blocks at block column 0, which its products sum) count
        once, as their sum."""
        rows, cols, values = self._triplets()
        held = values != 0
        places = widen(rows)[held] * max(int(self.shape[1]), 1) + widen(cols)[held]
        unique, inverse = torch.unique(places, return_inverse=True)
        if len(unique) == len(places):  # (no place stored twice: every nonzero value is a nonzero of the matrix)
            return len(places)
        sums = torch.zeros(len(unique), dtype=values.dtype).index_add_(0, inverse, values[held])
        return int((sums != 0).sum())

    # -- product ----------------------------------------------------------
    def matmul(self, dense: torch.Tensor) -> torch.Tensor:
        """``self @ dense`` for dense (strided, with values: not a torch
        sparse layout or meta) of shape (K, N) or (K,), without
        gradients (a dense that requires one is a RuntimeError where autograd
        is on). The (M, N)
        output and the product's M + 1 row pointers are checked against
        :data:`pointsparse.tensor.MAX_DENSE_BYTES` first (a ValueError naming
        the shapes: a valid format may declare a huge, nearly empty matrix)."""
        check_data(dense, "dense")  # (a sparse layout was torch's bare error; a meta tensor ran)
        M, K = self.shape
        vector = dense.dim() == 1
        if dense.dim() not in (1, 2) or dense.shape[0] != K:
            raise ValueError(
                f"dense must be ({K}, N) or ({K},) to multiply a {M} x {K} {type(self).__name__}; "
                f"got shape {tuple(dense.shape)}"
            )
        if dense.dtype != self.dtype:
            raise TypeError(f"dense must have dtype {self.dtype} like the weight; got {dense.dtype}")
        what = f"{type(self).__name__}.matmul"
        if _ext.needs_grad(dense):  # the product is not differentiable: say so
            raise RuntimeError(f"{what} gives no gradient for dense, which requires one; "
                               "run it under torch.no_grad() or pass dense.detach()")
        if _ext.carries_tangent(dense):  # (else dropped: a silent zero)
            raise RuntimeError(f"{what} gives no tangent for dense, which carries a forward-mode one "
                               "(torch.func.jvp, torch.autograd.forward_ad); pass a plain tensor")
        with outside_transforms(dense, what, "multiply a tensor made outside the transform, or to_dense() inside it"):
            dense2 = dense[:, None] if vector else dense
            N = dense2.shape[1]
            self._check_product(N, tuple(dense.shape))
            if _ext.serves(dense2, dtypes=_KERNEL_DTYPES):
                try:  # (the core allocates the output: numpy's MemoryError where it cannot)
                    out = self._kernel(_ext.to_numpy(dense2.detach()))
                except MemoryError as exc:
                    raise self._unallocated(N, tuple(dense.shape), exc) from None
                out = _ext.to_tensor(out)
            else:
                try:
                    out = torch.zeros(M, N, dtype=dense.dtype, device=dense.device)
                except RuntimeError as exc:  # the allocator refused (torch.OutOfMemoryError on a GPU)
                    raise self._unallocated(N, tuple(dense.shape), exc) from None
                rows, cols, values = self._triplets()
                out = torch_spmm(rows, cols, values, dense2.detach(), M, out=out)
            return out[:, 0] if vector else out

    __matmul__ = matmul

    def _check_product(self, N: int, dense_shape: tuple) -> None:
        """The bytes ``matmul`` allocates (an (M, N) output of ``dtype`` and
        M + 1 int64 row pointers) against the dense limit, before any."""
        M = self.shape[0]
        check_dense_bytes(M * N * torch.empty((), dtype=self.dtype).element_size() + 8 * (M + 1),
                          f"matmul of a {type(self).__name__} of shape {tuple(self.shape)} with dense of shape "
                          f"{dense_shape}", f" for its ({M}, {N}) output and row pointers")

    def _unallocated(self, N: int, dense_shape: tuple, exc: BaseException) -> ValueError:
        """The ValueError for a product under the dense limit whose (M, N)
        output the process cannot allocate (as ``SparseTensor.dense()``
        turns its allocator's refusal into one)."""
        M = self.shape[0]
        nbytes = M * N * torch.empty((), dtype=self.dtype).element_size()
        return ValueError(f"matmul of a {type(self).__name__} of shape {tuple(self.shape)} with dense of shape "
                          f"{dense_shape}: its ({M}, {N}) output ({nbytes:,} bytes) could not be allocated "
                          f"(multiply fewer columns at a time): {exc}")

    def _kernel(self, dense_np):  # pragma: no cover - abstract
        raise NotImplementedError

    def _triplets(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype}, "
            f"nbytes={self.nbytes()}, dense_nbytes={self.dense_nbytes()})"
        )
