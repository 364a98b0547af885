// The portable build of the SpMM kernels (the compiler's baseline ISA).
#include "spmm/kernels.h"

namespace ps {
namespace spmm {
namespace generic {
PS_SPMM_DEFINE_ENTRY_POINTS
}  // namespace generic
}  // namespace spmm
}  // namespace ps
