// The pointsparse._core extension module: flat buffers in, flat buffers out.
#include "bind.h"

PYBIND11_MODULE(_core, m) {
  m.doc() = "pointsparse C++ core (OpenMP); private, use the pointsparse package";
  ps::bind_coords(m);
  ps::bind_voxelize(m);
  ps::bind_kmap(m);
  ps::bind_conv(m);
  ps::bind_spmm(m);
  ps::bind_runtime(m);
}
