# Hand-written stub of the private C++ core (pointsparse._core). Only
# pointsparse._ext imports it. Every function takes flat numpy buffers (any
# layout; converted to C order, and to the dtype named, when needed), checks
# what could corrupt memory (ValueError naming the argument), releases the
# GIL, keeps no state, and runs on `num_threads` OpenMP threads (below 1
# means 1; calls with less than 16k rows of work run on one thread). Results
# are identical for every thread count.
from typing import Sequence

import numpy as np
import numpy.typing as npt

COORD_MIN: int  # -2**31: x, y, z are any int32
COORD_MAX: int  # 2**31 - 1
BATCH_MAX: int  # 2**31 - 1 (batch >= 0)
KEY_BITS: int  # 63: a key layout's fields add up to at most this
MAX_KERNEL_VOLUME: int  # 32**3 offsets per kernel map
CONV_BLOCK_ROWS: int  # written rows per work block of the fused kernels (each thread takes blocks in turn)

# A key layout travels as 7 ints: origin x, y, z, then the bits of the batch,
# x, y, z fields (pointsparse.coords.KeyLayout). Keys of one layout compare.
Layout = Sequence[int]

def coords_bounds(coords: npt.NDArray[np.int32], num_threads: int) -> npt.NDArray[np.int64]:
    """(2, 4): smallest and largest [batch, x, y, z] (lo > hi without rows);
    ValueError naming the first row with a negative batch."""

def fit_layout(lo: Sequence[int], hi: Sequence[int], margin: Sequence[int]) -> list[int]:
    """The layout of rows within [lo, hi] with margin[a] spare values per side
    of axis a when the key still fits 63 bits (else none); ValueError naming
    the span that does not fit."""

def pack_keys(coords: npt.NDArray[np.int32], layout: Layout, num_threads: int) -> npt.NDArray[np.int64]:
    """(N, 4) [batch, x, y, z] -> (N,) keys of layout; ValueError naming the first row outside it."""

def unpack_keys(keys: npt.NDArray[np.int64], layout: Layout, num_threads: int) -> npt.NDArray[np.int32]:
    """(N,) keys of layout -> (N, 4) int32 [batch, x, y, z]; ValueError for keys outside it."""

def sort_keys(keys: npt.NDArray[np.int64], num_threads: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Stable radix sort of (N,) non-negative keys: (sorted_keys, perm)."""

def unique_keys(
    keys: npt.NDArray[np.int64], num_threads: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(unique_keys (M,) ascending, inverse (N,), perm (N,), seg_ptr (M + 1,)): rows
    perm[seg_ptr[j]:seg_ptr[j + 1]] hold key j, in their original order."""

def quantize(
    points: npt.NDArray[np.floating],
    voxel_size: Sequence[float],
    batch: npt.NDArray[np.int64] | None,
    num_threads: int,
) -> tuple[npt.NDArray[np.int64], list[int]]:
    """(N, 3) points -> ((N,) keys of [batch, floor(points / voxel_size)] (float64
    division), the layout fitted to them); ValueError for non-finite rows,
    voxel coordinates outside int32 or a span that does not fit a key."""

def segment_reduce(
    feats: npt.NDArray[np.float32] | npt.NDArray[np.float64],
    perm: npt.NDArray[np.int64],
    seg_ptr: npt.NDArray[np.int64],
    mode: int,
    num_threads: int,
) -> tuple[np.ndarray, npt.NDArray[np.int64]]:
    """Reduce rows perm[seg_ptr[j]:seg_ptr[j + 1]] of (N, C) feats into (M, C):
    mode 0 sum, 1 mean (sum / count), 2 max, 3 first. The second result is the
    source row of each max (M, C), of each first (M,), empty otherwise."""

def voxelize(
    points: npt.NDArray[np.floating],
    feats: npt.NDArray[np.float32] | npt.NDArray[np.float64],
    voxel_size: Sequence[float],
    batch: npt.NDArray[np.int64] | None,
    mode: int,
    num_threads: int,
    with_arg: bool = True,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64], np.ndarray,
           npt.NDArray[np.int64]]:
    """quantize + unique_keys + unpack_keys + segment_reduce in one call:
    (coords (M, 4) int32 sorted by key, inverse (N,), perm (N,), seg_ptr
    (M + 1,), reduced feats (M, C), arg as segment_reduce's; empty with
    ``with_arg=False``, where no gradient needs it). ValueError
    naming the argument (points, feats, voxel_size, batch, mode) or the row."""

def trilinear_neighbors(
    points: npt.NDArray[np.floating],
    batch: npt.NDArray[np.int64] | None,
    voxel_size: Sequence[float],
    stride: Sequence[int],
    layout: Layout,
    sorted_keys: npt.NDArray[np.int64],
    sorted_rows: npt.NDArray[np.int64],
    num_voxels: int,
    num_threads: int,
) -> tuple[npt.NDArray[np.int64], np.ndarray]:
    """(idx (N, 8), weights (N, 8)) from the voxels' keys in `layout`
    (ascending, with their rows): the rows of the 8 voxels whose centres
    (c + stride / 2) * voxel_size surround each point (-1 where inactive), corner
    order (x, y, z) bits with z fastest, and trilinear weights renormalised
    over the active corners (float64 points: float64 weights, else float32)."""

def conv_weight_vectors(weight: np.ndarray, transpose: bool = False) -> np.ndarray:
    """int32 (K, panels): per offset and panel of nr columns (16 float32, 8
    float64) the rows of weight[k] (weight[k].T when transpose) holding a
    nonzero in the panel: the vectors the vector-sparse kernels visit.
    ValueError for an empty weight whose tables (K x panels, rows x panels)
    would pass 2^24 entries (conv_execution alike)."""

def reuse_freed_memory(on: bool, bytes: int) -> bool:
    """glibc malloc: on, blocks up to `bytes` come from the heap and freed
    memory up to `bytes` stays in the process (M_MMAP_THRESHOLD,
    M_TRIM_THRESHOLD); off, glibc's 128 KiB defaults. False where the C
    library is not glibc (nothing changed)."""

def pooled_empty(shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-contiguous array from the output pool
    (cpp/runtime/pool.h); its memory goes back to the pool when the array
    (and a torch tensor made of it by torch.from_numpy) is freed. ValueError
    for a negative or empty shape, one of more bytes than a process can
    address, or a dtype other than bool, integer, float or complex (object,
    unicode, structured: their items cannot be left uninitialised)."""

def output_pool(limit: int) -> dict[str, int]:
    """The output pool's state after setting its limit in bytes (-1:
    unchanged; 0: keep nothing): max_bytes, kept_bytes, kept_blocks, hits,
    misses."""

def conv_execution(
    weight: np.ndarray, transpose: bool, region: np.ndarray | None, threshold: float,
    twin_threshold: float | None = None,
) -> tuple[np.ndarray | None, bool, float]:
    """(active, vector, density): the fused engine's choice for weight (K,
    C_in, C_out) (weight[k].T per offset when transpose): active None where
    every offset runs, else uint8 (K,) flags (an offset runs where it holds a
    nonzero and region, uint8 (K,) or None, keeps it); density the run
    offsets' listed vectors over all their vectors (0 with none run);
    vector: density <= threshold, or with twin_threshold (finite, >= 0,
    else ValueError) density <= threshold + (twin_threshold - threshold) * the
    share of those vectors in twin panels (adjacent whole panels listing
    the same rows, paired from panel 0)."""

def conv_stream_bytes(bytes: int | None = None) -> int:
    """Output bytes from which the fused forward streams its output (each
    block of rows summed in a per-thread scratch block, written with
    non-temporal stores; default 2**62: off). With `bytes` (>= 0, else
    ValueError): sets it, process-wide, and returns the previous value; with
    None returns it. For tests and benchmarks."""

def conv_stream_auto_bytes(bytes: int | None = None) -> int:
    """Output bytes from which a forward that ``ConvPlan.streams_output``
    marks (offset pruning that leaves out the identity offset) streams its
    output (default 8 MiB where ``avx512_full_width()``, as measured
    there, else 2**62: never). With `bytes` (>= 0, else
    ValueError): sets it, process-wide, and returns the previous value; with
    None returns it. For tests and benchmarks."""

def conv_streamed() -> bool:
    """Whether the last float forward or input gradient of ConvPlan this
    thread ran streamed its output. For tests and benchmarks."""

def conv_isa() -> str:
    """Instruction set the fused convolution kernels use on this CPU by default:
    'avx512', 'avx2' or 'generic' (the widest build that runs here, or
    ``set_isa_limit``'s narrower one)."""

def set_isa_limit(limit: str | None) -> str | None:
    """Caps the instruction set every call without an `isa` of its own runs
    (conv_isa, spmm_isa) at `limit` ('generic', 'avx2', 'avx512'; None: no
    cap), process-wide, and returns the previous cap; TypeError / ValueError
    for another value. Below
    'avx512' the bf16 kernels and AMX tiles are off and avx512_full_width()
    is False: the engine runs as on a CPU without AVX-512. pointsparse calls
    it at import from POINTSPARSE_ISA (the engine's thresholds are read at
    import). For tests and benchmarks."""

def conv_bf16() -> bool:
    """Whether ConvPlan.forward_bf16 (AVX512-BF16 vdpbf16ps) runs on this CPU."""

def avx512_full_width() -> bool:
    """Whether the avx512 build runs on a CPU that executes 512-bit FMAs at
    full width (Intel; AMD from Zen 5, family 0x1A, not its laptop parts;
    AMD Zen 4: two 256-bit halves), or what ``set_avx512_full_width`` set:
    where the dense AVX-512 kernels gain most over the AVX2 vector-sparse
    kernels."""

def avx512_full_width_detected() -> bool:
    """What the CPU answers to ``avx512_full_width``, whatever was set."""

def set_avx512_full_width(value: int) -> None:
    """Overrides ``avx512_full_width`` (1 or 0; -1: the CPU's answer again),
    process-wide; ValueError for another value, or 1 where the avx512 build
    does not run. pointsparse calls it at import from
    ``POINTSPARSE_AVX512_FULL_WIDTH``."""

def next_block_fetch() -> bool:
    """Whether the vector-sparse and bf16 walks fetch the thread's next
    block's opening rows into L2 during this one: on Intel CPUs (where it
    gained), not on AMD's (where it cost), or what ``set_next_block_fetch``
    set."""

def set_next_block_fetch(value: int) -> None:
    """Overrides ``next_block_fetch`` (1 or 0; -1: the CPU's answer again),
    process-wide; ValueError for another value. For tests and benchmarks:
    the outputs are the same bits either way."""

def conv_amx() -> bool:
    """Whether ConvPlan.forward_bf16's AMX form (tiles_width) runs here:
    AMX-TILE and AMX-BF16 on top of AVX512-BF16, and the OS's leave to use
    the tiles (Linux: arch_prctl XTILEDATA, asked once)."""

def runnable_isas() -> list[str]:
    """The kernel builds (conv and SpMM) this CPU runs, widest first: the
    values an `isa` argument accepts."""

class ConvPlan:
    """The pairs of a kernel map checked once (bounds, one pair per row and
    offset, the identity offset really the identity) and laid out for the
    fused convolution kernels: int32 pairs per offset sorted by output row and
    by input row, and their cuts at every 512-row block (kBlockRows; a plan
    whose cut tables would pass 2^28 entries, 2 GiB, is a ValueError before
    they are allocated). The calls below check only the shapes, dtypes and
    layouts of the arrays they are given."""

    num_in: int
    num_out: int
    kernel_volume: int
    identity: int
    num_pairs: int

    def __init__(
        self,
        in_idx: npt.NDArray[np.int64],
        out_idx: npt.NDArray[np.int64],
        ptr: npt.NDArray[np.int64],
        num_in: int,
        num_out: int,
        identity: int,
        num_threads: int = 1,
    ) -> None: ...
    def forward(
        self, feats: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, out: np.ndarray, num_threads: int,
        isa: str | bool | None = None, relu: bool = False, active: np.ndarray | None = None, vector: bool = False,
        add: np.ndarray | None = None,
    ) -> None:
        """out = bias + sum over offsets o of feats[in_idx] @ weight[o] added at
        out_idx (bias None: zero); writes every row of out. `isa`: None (the
        widest build that runs here), 'generic', 'avx2' or 'avx512' (ValueError
        where it does not run); a bool is the former `portable` flag (True:
        'generic'). relu: max(out, 0) in the kernel's epilogue (inference).
        add: None or a residual of out's shape and dtype (C-contiguous, not
        sharing out's memory) added to out before the ReLU, block by block."""
    def streams_output(self, active: np.ndarray | None = None, vector: bool = False) -> bool:
        """Whether forward(active=, vector=) marks its output to stream once it
        holds conv_stream_auto_bytes() bytes: the dense kernels on a
        submanifold map whose identity offset `active` leaves out, running no
        more pairs than the map has output rows (offset pruning). Streamed in
        the avx512 build's float32 forward only (conv_streamed() tells)."""
    def forward_bf16(
        self, feats: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, out: np.ndarray | None, num_threads: int,
        relu: bool = False, out_bf16: np.ndarray | None = None, vector_density: float = -1.0,
        add: np.ndarray | None = None, tiles_width: float = float("inf"),
    ) -> str:
        """Inference forward in bf16: feats and weight hold bf16 bits (int16 or
        uint16), bias (float32 or None) and out float32; products summed in
        float32 (AVX512-BF16 vdpbf16ps). out_bf16 (bf16 bits, out's shape, or
        None): out rounded to bf16 as torch rounds, block by block. out may
        be None where out_bf16 is given: the float32 sums are then kept block
        by block only (never written in full). ValueError where both are
        None. Offsets whose weight is all zero are skipped; where at most
        vector_density (negative: never) of the kept offsets' bf16 vectors (offset, channel
        pair, 16 output columns) hold a nonzero, only those run. add: None or
        a bf16 residual (bf16 bits, out's shape, not sharing memory with out
        or out_bf16) added in float32 before the ReLU. tiles_width: where
        conv_amx() and the listed width (the density of listed vectors x
        sqrt(C_in x C_out)) is at least tiles_width, every kept offset runs
        on the AMX tiles (16 pairs x 16 columns a tile, summed from zero in
        float32, then added to the row); infinite (default): never; NaN:
        ValueError. Returns what ran: 'dense', 'offsets', 'vector' or
        'tiles'. ValueError where the CPU lacks AVX512-BF16."""
    def transposed(self) -> "ConvPlan":
        """The plan of the transposed map (inputs and outputs swapped), sharing
        this plan's pairs: no pass over them."""
    def backward_input(
        self, grad: np.ndarray, weight: np.ndarray, grad_feats: np.ndarray, num_threads: int,
        isa: str | bool | None = None, active: np.ndarray | None = None, vector: bool = False,
    ) -> None:
        """grad_feats = sum over offsets o of grad[out_idx] @ weight[o].T added at in_idx (active, vector: as
        in forward)."""
    def backward_weight(
        self, feats: np.ndarray, grad: np.ndarray, grad_weight: np.ndarray, num_threads: int,
        isa: str | bool | None = None, active: np.ndarray | None = None, mask: np.ndarray | None = None,
    ) -> None:
        """grad_weight[o] = feats[in_idx].T @ grad[out_idx] for every offset o; zero for offsets active leaves
        out and, with mask (K, C_in, C_out), for the vectors where the mask is all zero (the entries computed
        equal the dense ones bit for bit)."""

def spmm_isa() -> str:
    """Instruction set the SpMM kernels use on this CPU by default: 'avx512',
    'avx2' or 'generic' (the same answer as conv_isa)."""

def csr_spmm(
    row_ptr: np.ndarray, col_idx: np.ndarray, values: np.ndarray, dense: np.ndarray, K: int, isa: str | bool | None,
    num_threads: int,
) -> np.ndarray:
    """CSR (M, K) @ dense (K, N) -> (M, N); index arrays in any unsigned width
    (1, 2, 4, 8 bytes); rows split among threads by nonzeros; `isa` as in
    ConvPlan.forward (None: the widest build that runs here)."""

def csr_conv_accumulate(
    row_ptr: np.ndarray, col_idx: np.ndarray, values: np.ndarray, feats: np.ndarray,
    in_idx: npt.NDArray[np.int64], out_idx: npt.NDArray[np.int64], out: np.ndarray, isa: str | bool | None,
    num_threads: int,
) -> None:
    """One sparse-conv kernel offset, in place: out[out_idx] += (S @ feats[in_idx].T).T
    with S (C_out, C_in) in CSR."""

def bsr_spmm(
    block_ptr: np.ndarray, block_col: np.ndarray, values: np.ndarray, dense: np.ndarray, M: int, K: int,
    isa: str | bool | None, num_threads: int,
) -> np.ndarray:
    """BSR (M, K) with values (nb, br, bc) @ dense (K, N) -> (M, N)."""

def nm_spmm(
    positions: np.ndarray, values: np.ndarray, bits: int, n: int, m: int, dense: np.ndarray, K: int,
    isa: str | bool | None, num_threads: int,
) -> np.ndarray:
    """N:M (M, K) with bit-packed positions (`bits` each) @ dense (K, N) -> (M, N)."""

def eie_spmm(
    col_ptr: np.ndarray, rel_idx: np.ndarray, values: np.ndarray, dense: np.ndarray, M: int, isa: str | bool | None,
    num_threads: int,
) -> np.ndarray:
    """EIE (M, K) over P processing elements (4-bit relative row indices, column
    pointers per PE) @ dense (K, N) -> (M, N)."""
def kmap_hash(
    in_coords: npt.NDArray[np.int32],
    out_coords: npt.NDArray[np.int32] | None,
    offsets: npt.NDArray[np.int32],
    num_threads: int,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Kernel map by an open-addressing table over the exact keys of in_coords
    (N, 4): (in_idx (P,), out_idx (P,), sizes (K,)) for offsets (K, 3), pairs
    grouped by offset, sorted by out_idx within one. out_coords None: the
    submanifold map (outputs are the inputs; mirrored offsets derived).
    ValueError for duplicate input rows or rows out of range."""

def kmap_mergesort(
    in_coords: npt.NDArray[np.int32],
    out_coords: npt.NDArray[np.int32] | None,
    offsets: npt.NDArray[np.int32],
    num_threads: int,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Kernel map by merging radix-sorted keys (one merge per (dx, dy) column
    of offsets): the same result as kmap_hash. Both pack in_coords and
    out_coords in one layout fitted to them with a margin of the largest
    |offset| per axis (rows checked one by one where the margin does not fit);
    1 to MAX_KERNEL_VOLUME offsets."""

def kmap_downsample(coords: npt.NDArray[np.int32], stride: Sequence[int], num_threads: int) -> npt.NDArray[np.int32]:
    """(M, 4) unique floor(c / stride) * stride rows per batch, sorted by
    (batch, x, y, z); ValueError when a row's output falls below int32."""

def kmap_restrict(
    in_idx: npt.NDArray[np.int64],
    out_idx: npt.NDArray[np.int64],
    sizes: npt.NDArray[np.int64],
    out_new: npt.NDArray[np.int64],
    num_threads: int,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(in_idx, out_idx, sizes) of a map's pairs (grouped by offset, sizes
    per offset) whose output row out_new keeps (out_new[q] >= 0: its new
    number, -1: dropped), out rows renumbered, in their order: the map onto
    the kept output rows (KernelMap.restricted). ValueError naming the array
    for an out_idx outside out_new, sizes that do not sum to the pairs or a
    negative size."""

def kmap_parents(
    coords: npt.NDArray[np.int32],
    stride: Sequence[int],
    kernel: Sequence[int],
    out_coords: npt.NDArray[np.int32] | None,
    num_threads: int,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]] | None:
    """The map of a conv whose kernel (1 or 2 offsets per axis, dilation 1)
    tiles its stride (stride = kernel x tensor stride per axis): (out_coords,
    in_idx, out_idx, sizes) equal to kmap_downsample then kmap_mergesort,
    each row paired with its parent through one sort and no search. None
    when out_coords are given and are not the downsampled coords. ValueError
    for a bad stride or kernel, a row off the tensor stride's grid, a
    duplicate row or an output below int32."""
