// Bindings of the convolution's gather and scatter-add kernels. Buffers are
// written in place: the Python side preallocates them (torch tensors viewed as
// numpy arrays), so every output is checked here for dtype, layout and shape.
#include <omp.h>

#include <algorithm>
#include <limits>

#include "array.h"
#include "bind.h"
#include "conv/gather_scatter.h"

namespace ps {
namespace {

bool is_c_contiguous(const py::array& a) { return a.flags() & py::array::c_style; }

// A float32/float64 2-D C-contiguous array; `writeable` for outputs.
void check_rows(const py::array& a, const char* name, bool writeable) {
  check_2d(a, -1, name);
  if (!is_c_contiguous(a)) value_error(std::string(name) + " must be C-contiguous");
  if (writeable && !a.writeable()) value_error(std::string(name) + " must be writeable");
}

void check_same_dtype(const py::array& a, const py::array& b, const char* na, const char* nb) {
  if (!a.dtype().is(b.dtype()))
    value_error(std::string(na) + " and " + nb + " must have the same dtype");
}

// Segments of `idx` as validated raw pointers; every index in a segment lies
// in [0, limit). Checked before any parallel region writes memory.
struct Segments {
  const int64_t* idx;
  const int64_t* start;
  const int64_t* len;
  int64_t count;
};

Segments check_segments(const carray<int64_t>& idx, const carray<int64_t>& start,
                        const carray<int64_t>& len, int64_t rows, int64_t limit, int nt) {
  check_1d(idx, idx.ndim() == 1 ? idx.shape(0) : -1, "idx");
  check_1d(start, start.ndim() == 1 ? start.shape(0) : -1, "start");
  check_1d(len, start.shape(0), "len");
  if (rows < 0) value_error("rows must be >= 0");
  const int64_t p = idx.shape(0), g = start.shape(0);
  const int64_t *s = start.data(), *l = len.data(), *ix = idx.data();
  for (int64_t i = 0; i < g; ++i) {
    if (l[i] < 0 || l[i] > rows || s[i] < 0 || s[i] > p - l[i])
      value_error("segment " + std::to_string(i) + " (start " + std::to_string(s[i]) + ", len " +
                  std::to_string(l[i]) + ") lies outside idx (" + std::to_string(p) +
                  " entries) or exceeds rows " + std::to_string(rows));
  }
  int64_t bad = 0;
  {
    py::gil_scoped_release release;
    for (int64_t i = 0; i < g; ++i) {
      const int64_t* seg = ix + s[i];
      const int64_t n = l[i];
#pragma omp parallel for num_threads(nt) reduction(+ : bad) schedule(static) if (n > 65536)
      for (int64_t j = 0; j < n; ++j) bad += (seg[j] < 0) | (seg[j] >= limit);
    }
  }
  if (bad) value_error("idx holds " + std::to_string(bad) + " indices outside [0, " + std::to_string(limit) + ")");
  return {ix, s, l, g};
}

template <typename T>
void gather_impl(const py::array& src, const Segments& seg, int64_t rows, py::array& buf, int nt) {
  const T* x = static_cast<const T*>(src.data());
  T* b = static_cast<T*>(buf.mutable_data());
  const int64_t c = src.shape(1);
  py::gil_scoped_release release;
  gather_segments<T>(x, c, seg.idx, seg.start, seg.len, seg.count, rows, b, nt);
}

template <typename T>
void scatter_impl(const py::array& buf, const Segments& seg, int64_t rows, py::array& dst, int nt) {
  const T* b = static_cast<const T*>(buf.data());
  T* y = static_cast<T*>(dst.mutable_data());
  const int64_t c = dst.shape(1);
  py::gil_scoped_release release;
  scatter_add_segments<T>(b, c, seg.idx, seg.start, seg.len, seg.count, rows, y, nt);
}

void check_buffer(const py::array& buf, int64_t segments, int64_t rows, int64_t channels) {
  if (buf.shape(0) != segments * rows || buf.shape(1) != channels)
    value_error("buf must be (segments * rows, channels) = (" + std::to_string(segments * rows) + ", " +
                std::to_string(channels) + "); got " + shape_str(buf));
}

template <typename Fn32, typename Fn64>
void dispatch(const py::array& a, Fn32 f32, Fn64 f64) {
  if (a.dtype().is(py::dtype::of<float>()))
    f32();
  else if (a.dtype().is(py::dtype::of<double>()))
    f64();
  else
    value_error("feats must be float32 or float64; got dtype " + std::string(py::str(a.dtype())));
}

// buf[g * rows + i] = src[idx[start[g] + i]], zero rows past len[g].
void gather(py::array src, carray<int64_t> idx, carray<int64_t> start, carray<int64_t> len, int64_t rows,
            py::array buf, int num_threads) {
  const int nt = threads(num_threads);
  check_rows(src, "src", false);
  check_rows(buf, "buf", true);
  check_same_dtype(src, buf, "src", "buf");
  const Segments seg = check_segments(idx, start, len, rows, src.shape(0), nt);
  check_buffer(buf, seg.count, rows, src.shape(1));
  dispatch(src, [&] { gather_impl<float>(src, seg, rows, buf, nt); },
           [&] { gather_impl<double>(src, seg, rows, buf, nt); });
}

// dst[idx[start[g] + i]] += buf[g * rows + i], segment after segment.
void scatter_add(py::array buf, carray<int64_t> idx, carray<int64_t> start, carray<int64_t> len, int64_t rows,
                 py::array dst, int num_threads) {
  const int nt = threads(num_threads);
  check_rows(buf, "buf", false);
  check_rows(dst, "dst", true);
  check_same_dtype(buf, dst, "buf", "dst");
  const Segments seg = check_segments(idx, start, len, rows, dst.shape(0), nt);
  check_buffer(buf, seg.count, rows, dst.shape(1));
  dispatch(dst, [&] { scatter_impl<float>(buf, seg, rows, dst, nt); },
           [&] { scatter_impl<double>(buf, seg, rows, dst, nt); });
}

}  // namespace

void bind_conv(py::module_& m) {
  m.def("conv_gather", &gather, py::arg("src"), py::arg("idx"), py::arg("start"), py::arg("len"),
        py::arg("rows"), py::arg("buf"), py::arg("num_threads"),
        "buf[g*rows+i] = src[idx[start[g]+i]] for i < len[g]; zero rows up to rows. In place.");
  m.def("conv_scatter_add", &scatter_add, py::arg("buf"), py::arg("idx"), py::arg("start"), py::arg("len"),
        py::arg("rows"), py::arg("dst"), py::arg("num_threads"),
        "dst[idx[start[g]+i]] += buf[g*rows+i] for i < len[g], segment by segment (indices unique within a "
        "segment); deterministic for any thread count. In place.");
}

}  // namespace ps
