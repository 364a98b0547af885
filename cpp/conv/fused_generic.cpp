// The fused convolution kernels for any CPU (the baseline instruction set).
#include <omp.h>

#include <cstdint>

#if defined(__SSE2__)
#include <immintrin.h>  // the baseline's streaming stores (stream_rows)
#endif

#include "conv/fused.h"
#include "conv/sparse.h"

// The kernels' 32-byte vector types are split into SSE halves here; they never
// cross a function boundary that is not inlined (internal linkage), so the
// ABI note GCC gives for them does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

#define PS_CONV_ISA Isa::generic
#define PS_CONV_VEC_BYTES 32
namespace ps {
namespace conv {
namespace generic {
#include "conv/fused_kernels.h"
#include "conv/sparse_kernels.h"
}  // namespace generic
}  // namespace conv
}  // namespace ps
