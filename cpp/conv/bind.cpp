// Bindings of the convolution: the plan (plan.h) and its kernels, the weight's
// vector counts (sparse.h). Buffers are written in place: the Python side
// preallocates them (torch tensors viewed as numpy arrays), so every argument
// is checked here for dtype, layout and shape before any kernel runs; the GIL
// is released around the kernels.
#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <pybind11/stl.h>

#include "array.h"
#include "bind.h"
#include "conv/fused.h"
#include "conv/plan.h"
#include "conv/sparse.h"
#include "isa_arg.h"

namespace ps {
namespace {

bool is_c_contiguous(const py::array& a) { return a.flags() & py::array::c_style; }

// A 2-D C-contiguous array (the dtype is checked by the call); `writeable` for outputs.
void check_rows(const py::array& a, const char* name, bool writeable) {
  check_2d(a, -1, name);
  if (!is_c_contiguous(a)) value_error(std::string(name) + " must be C-contiguous");
  if (writeable && !a.writeable()) value_error(std::string(name) + " must be writeable");
}

// The weight of the vector counts: a C-contiguous (K, C_in, C_out) array.
// The counts are int32 counts of rows, and an empty weight is walked row by
// row all the same: every dimension below 2^31.
void check_counted_weight(const py::array& weight) {
  constexpr py::ssize_t kMax = std::numeric_limits<int32_t>::max();
  if (weight.ndim() != 3 || !is_c_contiguous(weight) || weight.shape(0) > kMax || weight.shape(1) > kMax ||
      weight.shape(2) > kMax)
    value_error("weight must be a C-contiguous (K, C_in, C_out) array with every dimension below 2^31; got shape " +
                shape_str(weight));
}

// An empty weight (a dimension 0) backs none of the tables its vector counts
// take (count_vectors, choose_execution): K x panels counts and twins, rows x
// panels marks (C_in rows, C_out when transposed), K flags. There each is
// held to kMaxEmptyWeightTable entries, checked before any is allocated; a
// weight with entries has at least as many as each table.
constexpr int64_t kMaxEmptyWeightTable = int64_t(1) << 24;

void check_empty_weight_tables(const py::array& weight, bool transpose) {
  if (weight.size() > 0) return;
  const int64_t K = weight.shape(0), c_in = weight.shape(1), c_out = weight.shape(2);
  const int64_t rows = transpose ? c_out : c_in;
  const int64_t np = dispatch_float(weight, "weight", [&](auto zero) {
    return conv::panels<decltype(zero)>(Isa::avx2, transpose ? c_in : c_out);
  });
  // Every dimension is below 2^31 and np below 2^28: no product overflows.
  const int64_t largest = std::max({K, K * np, rows * np});
  if (largest > kMaxEmptyWeightTable)
    value_error("weight of shape " + shape_str(weight) + " holds no entries, but its vector counts would take a table of " +
                std::to_string(largest) + " entries (kernel_volume x column panels, or rows x column panels; " +
                (transpose ? "rows C_out, columns C_in" : "rows C_in, columns C_out") +
                "); an empty weight takes at most 2^24 a table");
}

py::array_t<int32_t> weight_vectors(py::array weight, bool transpose) {
  check_counted_weight(weight);
  check_empty_weight_tables(weight, transpose);
  const int64_t K = weight.shape(0), c_in = weight.shape(1), c_out = weight.shape(2);
  py::array_t<int32_t> counts;
  dispatch_float(weight, "weight", [&](auto zero) {
    using T = decltype(zero);
    counts = py::array_t<int32_t>({K, conv::panels<T>(Isa::avx2, transpose ? c_in : c_out)});
    conv::count_vectors(static_cast<const T*>(weight.data()), K, c_in, c_out, transpose, counts.mutable_data());
  });
  return counts;
}

// (active, vector, density): conv::choose_execution; active None where
// every offset is kept, else uint8 (K,) flags.
py::tuple weight_execution(py::array weight, bool transpose, py::object region, double threshold,
                           std::optional<double> twin_threshold) {
  check_counted_weight(weight);
  check_empty_weight_tables(weight, transpose);
  const int64_t K = weight.shape(0), c_in = weight.shape(1), c_out = weight.shape(2);
  if (std::isnan(threshold)) value_error("threshold must be a number; got nan");
  if (twin_threshold && !(std::isfinite(*twin_threshold) && *twin_threshold >= 0))
    value_error("twin_threshold must be a finite number >= 0 or None; got " + std::to_string(*twin_threshold));
  const uint8_t* flags = nullptr;
  carray<uint8_t> region_array;
  if (!region.is_none()) {
    region_array = as_carray<uint8_t>(region, "region");
    check_1d(region_array, K, "region");
    flags = region_array.data();
  }
  py::array_t<uint8_t> keep(K);
  uint8_t* out = keep.mutable_data();
  conv::Execution e{};
  dispatch_float(weight, "weight", [&](auto zero) {
    using T = decltype(zero);
    e = conv::choose_execution(static_cast<const T*>(weight.data()), K, c_in, c_out, transpose, flags, threshold, out,
                               twin_threshold ? *twin_threshold : -1.0);
  });
  return py::make_tuple(e.all_kept ? py::object(py::none()) : py::object(keep), e.vector, e.density);
}

// The most block cuts a plan may hold (8 bytes each: 2 GiB), more than the
// 27 offsets of a 3x3x3 map over 2^31 rows both ways need (2.3e8).
constexpr int64_t kMaxCutEntries = int64_t(1) << 28;

// ConvPlan: a conv::Plan (plan.h) built from a map's int64 pairs. Every
// shape and range is checked here; the pairs are checked while the plan is
// built (its status raised here).
std::unique_ptr<conv::Plan> make_plan(carray<int64_t> in_idx, carray<int64_t> out_idx, carray<int64_t> ptr, int64_t num_in,
                     int64_t num_out, int64_t identity, int num_threads) {
  check_1d(in_idx, -1, "in_idx");
  check_1d(out_idx, in_idx.shape(0), "out_idx");
  check_1d(ptr, -1, "ptr");
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  if (num_in < 0 || num_in > kMax) value_error("num_in must be in [0, 2^31); got " + std::to_string(num_in));
  if (num_out < 0 || num_out > kMax) value_error("num_out must be in [0, 2^31); got " + std::to_string(num_out));
  if (ptr.shape(0) < 1) value_error("ptr must hold kernel_volume + 1 >= 1 entries");
  const int64_t K = ptr.shape(0) - 1, P = in_idx.shape(0);
  const int64_t *pp = ptr.data(), *in = in_idx.data(), *out = out_idx.data();
  if (pp[0] != 0 || pp[K] != P) value_error("ptr must start at 0 and end at the number of pairs " + std::to_string(P));
  for (int64_t k = 0; k < K; ++k)
    if (pp[k + 1] < pp[k]) value_error("ptr must be non-decreasing (offset " + std::to_string(k) + ")");
  if (identity < -1 || identity >= K)
    value_error("identity must be -1 or an offset index in [0, " + std::to_string(K) + "); got " +
                std::to_string(identity));
  // The plan's block cuts, both ways: K entries per block of kBlockRows rows,
  // checked before they are allocated and zero-filled (~300 offsets over 2^31
  // rows would be 20 GB). No overflow: K is compared first, blocks < 2^23.
  const int64_t row_blocks = num_in / conv::kBlockRows + num_out / conv::kBlockRows + 4;
  if (K > kMaxCutEntries || row_blocks * K > kMaxCutEntries)
    value_error("a plan of " + std::to_string(K) + " offsets over num_in = " + std::to_string(num_in) +
                " and num_out = " + std::to_string(num_out) + " rows would hold about " +
                std::to_string(K > kMaxCutEntries ? K : row_blocks * K) + " block cuts, past " +
                std::to_string(kMaxCutEntries) + " (2 GiB): fewer offsets or rows");
  const int nt = threads(num_threads, P);
  conv::PlanStatus st;
  std::unique_ptr<conv::Plan> plan;
  {
    py::gil_scoped_release release;
    plan.reset(new conv::Plan(in, out, pp, K, num_in, num_out, identity, nt, st));
  }
  if (st.ok()) return plan;
  if (st.bad_in >= 0)
    value_error("in_idx[" + std::to_string(st.bad_in) + "] = " + std::to_string(in[st.bad_in]) + " outside [0, " +
                std::to_string(num_in) + ")");
  if (st.bad_out >= 0)
    value_error("out_idx[" + std::to_string(st.bad_out) + "] = " + std::to_string(out[st.bad_out]) + " outside [0, " +
                std::to_string(num_out) + ")");
  if (st.not_identity) value_error("the pairs of offset " + std::to_string(identity) + " are not the identity");
  if (st.repeated_offset >= 0)
    value_error("offset " + std::to_string(st.repeated_offset) + " pairs " +
                (st.repeated_by_input ? "input" : "output") + " row " + std::to_string(st.repeated_row) + " twice");
  value_error("the kernel map is not valid (a check of make_plan without a message here)");
  return plan;  // not reached
}

void rows_are(const py::array& a, int64_t rows, const char* name, const char* what) {
  if (a.shape(0) != rows)
    value_error(std::string(name) + " must have " + what + " = " + std::to_string(rows) + " rows; got shape " +
                shape_str(a));
}

void check_weight(const conv::Plan& plan, const py::array& w, int64_t c_in, int64_t c_out,
                  const char* name = "weight") {
  const int64_t K = plan.kernel_volume();
  if (w.ndim() != 3 || w.shape(0) != K || w.shape(1) != c_in || w.shape(2) != c_out)
    value_error(std::string(name) + " must be (kernel_volume, C_in, C_out) = (" + std::to_string(K) + ", " +
                std::to_string(c_in) + ", " + std::to_string(c_out) + "); got " + shape_str(w));
  if (!is_c_contiguous(w)) value_error(std::string(name) + " must be C-contiguous");
}


void check_bf16_bits(const py::array& a, const char* name) {
  if (a.itemsize() != 2 || (a.dtype().kind() != 'i' && a.dtype().kind() != 'u'))
    value_error(std::string(name) + " must hold bf16 bits as int16 or uint16; got " + dtype_str(a));
}

// The arrays of one direction: src read (rows on the read side), dst
// written (rows on the written side), weight (K, C_in, C_out); transpose:
// the input-gradient direction (read side = outputs, written = inputs).
void check_apply(const conv::Plan& plan, const py::array& src, const char* src_name, const py::array& dst,
                 const char* dst_name, const py::array& weight, bool transpose) {
  check_rows(src, src_name, false);
  check_rows(dst, dst_name, true);
  check_weight(plan, weight, transpose ? dst.shape(1) : src.shape(1), transpose ? src.shape(1) : dst.shape(1));
  rows_are(src, plan.rows(!transpose), src_name, transpose ? "num_out" : "num_in");
  rows_are(dst, plan.rows(transpose), dst_name, transpose ? "num_in" : "num_out");
  check_same_dtype(weight, src, "weight", src_name);
  check_same_dtype(dst, src, dst_name, src_name);
  // The kernels read src and weight while blocks of dst are written.
  apart(src, src_name, dst, dst_name);
  apart(weight, "weight", dst, dst_name);
}

// The offsets one call runs: `active` None (all) or K uint8 flags.
conv::Skip skip_of(const conv::Plan& plan, const py::object& active, bool by_input) {
  if (active.is_none()) return conv::Skip(plan, by_input, nullptr);
  const carray<uint8_t> flags = as_carray<uint8_t>(active, "active");
  check_1d(flags, plan.kernel_volume(), "active");
  return conv::Skip(plan, by_input, flags.data());
}

// A bias that is not None: a C-contiguous (cols,) array (float32 when asked).
py::array bias_of(const py::object& bias, int64_t cols, bool float32) {
  py::array b = py::array::ensure(bias);
  if (!float32 && !b) value_error("bias must be an array or None");
  if (float32 && (!b || !b.dtype().is(py::dtype::of<float>()))) value_error("bias must be a float32 array or None");
  check_1d(b, cols, "bias");
  if (!is_c_contiguous(b)) value_error("bias must be C-contiguous");
  return b;
}

// An optional array argument with out's rows and columns: false for None,
// else true with `a` set to a C-contiguous 2-D numpy array (writeable when
// asked); TypeError / ValueError naming it.
bool rows_like_out(const py::object& arg, const char* name, const py::array& out, const conv::Plan& plan,
                   bool writeable, py::array& a) {
  if (arg.is_none()) return false;
  if (!py::isinstance<py::array>(arg)) throw py::type_error(std::string(name) + " must be a numpy array or None");
  a = py::reinterpret_borrow<py::array>(arg);
  check_rows(a, name, writeable);
  rows_are(a, plan.num_out(), name, "num_out");
  if (a.shape(1) != out.shape(1)) value_error(std::string(name) + " must have out's columns");
  return true;
}

// One product over the plan (forward, or the input gradient when transpose).
// add (forward only, or null): a residual of dst's shape and dtype, added
// before the ReLU.
void apply(const conv::Plan& plan, const py::array& src, const py::array& weight, const py::array* bias,
           py::array& dst, bool transpose, int num_threads, Isa isa, bool relu, const conv::Skip& skip, bool vector,
           const py::array* add = nullptr) {
  dispatch_float(src, transpose ? "grad" : "feats", [&](auto zero) {
    using T = decltype(zero);
    const T* b = bias ? static_cast<const T*>(bias->data()) : nullptr;
    const T* r = add ? static_cast<const T*>(add->data()) : nullptr;
    const T* s = static_cast<const T*>(src.data());
    const T* w = static_cast<const T*>(weight.data());
    T* d = static_cast<T*>(dst.mutable_data());
    const int64_t kc = src.shape(1), cols = dst.shape(1);
    py::gil_scoped_release release;
    conv::run_apply<T>(plan, s, w, b, d, kc, cols, transpose, skip, threads(num_threads), isa, relu, vector, r);
  });
}

// out = bias + sum over offsets o of out[out_idx] += feats[in_idx] @ weight[o].
// `active`: None (every offset) or K flags, the offsets run (a skipped
// offset's pairs are left out); `vector`: the vector-sparse kernels; `add`:
// None or a residual (out's shape and dtype, C-contiguous, not sharing
// out's memory) added before the ReLU.
void forward(const conv::Plan& plan, py::array feats, py::array weight, py::object bias, py::array out,
             int num_threads, py::object isa, bool relu, py::object active, bool vector, py::object add) {
  const Isa use = isa_arg(isa);
  check_apply(plan, feats, "feats", out, "out", weight, false);
  py::array b;
  const bool has_bias = !bias.is_none();
  if (has_bias) {
    b = bias_of(bias, out.shape(1), false);
    check_same_dtype(b, feats, "bias", "feats");
    apart(b, "bias", out, "out");
  }
  py::array r;
  const bool has_add = rows_like_out(add, "add", out, plan, false, r);
  if (has_add) {
    check_same_dtype(r, out, "add", "out");
    apart(r, "add", out, "out");
  }
  apply(plan, feats, weight, has_bias ? &b : nullptr, out, false, num_threads, use, relu,
        skip_of(plan, active, false), vector, has_add ? &r : nullptr);
}

// The bf16 inference forward: feats and weight hold bf16 bits (int16 or
// uint16 arrays), bias and out float32; products summed in float32.
// out may be None where out_bf16 is given (the sums then kept block by
// block only). Returns what ran: "dense", "offsets" (all-zero offsets
// skipped) or "vector" (the vector-sparse form, where the density of listed
// vectors is at most vector_density; negative: never).
std::string forward_bf16(const conv::Plan& plan, py::array feats, py::array weight, py::object bias, py::object out_arg,
                         int num_threads, bool relu, py::object out_bf16, double vector_density, py::object add,
                         double tiles_width) {
  if (!conv::bf16_runs())
    value_error("forward_bf16 needs AVX-512 with AVX512-BF16; this CPU (or build) runs: " + runnable_isas());
  check_rows(feats, "feats", false);
  if (out_arg.is_none() && out_bf16.is_none()) value_error("forward_bf16 needs out, out_bf16 or both; got neither");
  // The array whose shape the others follow: out, else out_bf16.
  const char* ref_name = out_arg.is_none() ? "out_bf16" : "out";
  const py::object& ref_arg = out_arg.is_none() ? out_bf16 : out_arg;
  if (!py::isinstance<py::array>(ref_arg)) throw py::type_error(std::string(ref_name) + " must be a numpy array");
  py::array ref = py::reinterpret_borrow<py::array>(ref_arg);
  check_rows(ref, ref_name, true);
  check_weight(plan, weight, feats.shape(1), ref.shape(1));
  rows_are(feats, plan.num_in(), "feats", "num_in");
  rows_are(ref, plan.num_out(), ref_name, "num_out");
  check_bf16_bits(feats, "feats");
  check_bf16_bits(weight, "weight");
  float* d = nullptr;
  if (!out_arg.is_none()) {
    if (!ref.dtype().is(py::dtype::of<float>())) value_error("out must be float32");
    d = static_cast<float*>(ref.mutable_data());
  }
  py::array b;
  if (!bias.is_none()) b = bias_of(bias, ref.shape(1), true);
  const auto* s = static_cast<const uint16_t*>(feats.data());
  const auto* w = static_cast<const uint16_t*>(weight.data());
  const float* bp = bias.is_none() ? nullptr : static_cast<const float*>(b.data());
  uint16_t* d16 = nullptr;
  py::array o16;
  if (rows_like_out(out_bf16, "out_bf16", ref, plan, true, o16)) {
    check_bf16_bits(o16, "out_bf16");
    d16 = static_cast<uint16_t*>(o16.mutable_data());
  }
  if (!(vector_density == vector_density)) value_error("vector_density must be a number, not NaN");
  if (!(tiles_width == tiles_width)) value_error("tiles_width must be a number, not NaN");
  const uint16_t* r = nullptr;
  py::array ra;
  if (d && d16) apart(o16, "out_bf16", ref, "out");
  // feats, weight and bias are read while blocks of the outputs are written.
  for (const py::array* o : {d ? &ref : nullptr, d16 ? &o16 : nullptr}) {
    if (!o) continue;
    const char* name = o == &ref ? "out" : "out_bf16";
    apart(feats, "feats", *o, name);
    apart(weight, "weight", *o, name);
    if (bp) apart(b, "bias", *o, name);
  }
  if (rows_like_out(add, "add", ref, plan, false, ra)) {
    check_bf16_bits(ra, "add");
    if (d) apart(ra, "add", ref, "out");
    if (d16) apart(ra, "add", o16, "out_bf16");
    r = static_cast<const uint16_t*>(ra.data());
  }
  const int64_t kc = feats.shape(1), cols = ref.shape(1);
  conv::Bf16Execution ran;
  {
    py::gil_scoped_release release;
    ran = conv::run_apply_bf16(plan, s, w, bp, d, kc, cols, threads(num_threads), relu, d16, vector_density, r,
                               tiles_width);
  }
  switch (ran) {
    case conv::Bf16Execution::vector: return "vector";
    case conv::Bf16Execution::offsets: return "offsets";
    case conv::Bf16Execution::tiles: return "tiles";
    default: return "dense";
  }
}

// grad_feats = sum over offsets o of grad_feats[in_idx] += grad[out_idx] @ weight[o]^T.
void backward_input(const conv::Plan& plan, py::array grad, py::array weight, py::array grad_feats, int num_threads,
                    py::object isa, py::object active, bool vector) {
  const Isa use = isa_arg(isa);
  check_apply(plan, grad, "grad", grad_feats, "grad_feats", weight, true);
  apply(plan, grad, weight, nullptr, grad_feats, true, num_threads, use, false, skip_of(plan, active, true), vector);
}

// grad_weight[o] = feats[in_idx]^T @ grad[out_idx] for every offset o.
// `active` as in forward (a skipped offset's gradient is zero); `mask`
// (K, C_in, C_out) or None: only the vectors (offset, input channel,
// panel of columns) where the mask holds a nonzero are computed.
void backward_weight(const conv::Plan& plan, py::array feats, py::array grad, py::array grad_weight,
                     int num_threads, py::object isa, py::object active, py::object mask) {
  const Isa use = isa_arg(isa);
  check_rows(feats, "feats", false);
  check_rows(grad, "grad", false);
  rows_are(feats, plan.num_in(), "feats", "num_in");
  rows_are(grad, plan.num_out(), "grad", "num_out");
  check_weight(plan, grad_weight, feats.shape(1), grad.shape(1), "grad_weight");
  if (!grad_weight.writeable()) value_error("grad_weight must be writeable");
  check_same_dtype(grad, feats, "grad", "feats");
  check_same_dtype(grad_weight, feats, "grad_weight", "feats");
  apart(feats, "feats", grad_weight, "grad_weight");
  apart(grad, "grad", grad_weight, "grad_weight");
  py::array m;
  if (!mask.is_none()) {
    m = py::array::ensure(mask);
    if (!m) value_error("mask must be an array or None");
    check_weight(plan, m, feats.shape(1), grad.shape(1), "mask");
    check_same_dtype(m, feats, "mask", "feats");
    apart(m, "mask", grad_weight, "grad_weight");
  }
  const conv::Skip skip = skip_of(plan, active, false);
  dispatch_float(feats, "feats", [&](auto zero) {
    using T = decltype(zero);
    const T* x = static_cast<const T*>(feats.data());
    const T* g = static_cast<const T*>(grad.data());
    T* gw = static_cast<T*>(grad_weight.mutable_data());
    const T* mp = mask.is_none() ? nullptr : static_cast<const T*>(m.data());
    py::gil_scoped_release release;
    conv::run_wgrad<T>(plan, x, g, gw, mp, feats.shape(1), grad.shape(1), skip, threads(num_threads), use);
  });
}

}  // namespace

void bind_conv(py::module_& m) {
  m.attr("CONV_BLOCK_ROWS") = conv::kBlockRows;
  m.def("conv_weight_vectors", &weight_vectors, py::arg("weight"), py::arg("transpose") = false,
        "int32 (K, panels): per offset k and panel p of nr columns (16 float32, 8 float64), the rows of "
        "weight[k] (weight[k].T when transpose) holding a nonzero in the panel: the vectors the vector-sparse "
        "kernels visit.");
  m.def("conv_execution", &weight_execution, py::arg("weight"), py::arg("transpose"), py::arg("region"),
        py::arg("threshold"), py::arg("twin_threshold") = py::none(),
        "(active, vector, density): the fused engine's choice for weight (K, C_in, C_out) (weight[k].T per offset "
        "when transpose): active None where every offset is run, else uint8 (K,) flags (an offset runs where "
        "it holds a nonzero and region, uint8 (K,) or None, keeps it); density the run offsets' listed vectors "
        "(conv_weight_vectors) over all their vectors, 0 with none run; vector: density <= threshold, or with "
        "twin_threshold (finite, >= 0) density <= threshold + (twin_threshold - threshold) * the share of those vectors "
        "in twin panels (adjacent whole panels listing the same rows, paired from panel 0: the avx512 build's "
        "two-vector tiles).");
  m.def(
      "conv_stream_bytes",
      [](std::optional<int64_t> bytes) {
        if (!bytes) return conv::stream_bytes();
        if (*bytes < 0) throw py::value_error("conv_stream_bytes: bytes must be >= 0, got " + std::to_string(*bytes));
        return conv::set_stream_bytes(*bytes);
      },
      py::arg("bytes") = py::none(),
      "Output bytes from which the fused forward streams its output (rows summed in a scratch block per "
      "thread, written with non-temporal stores; default 2**62: off); with `bytes` sets it (process-wide) "
      "and returns the previous value. For tests and benchmarks.");
  m.def(
      "conv_stream_auto_bytes",
      [](std::optional<int64_t> bytes) {
        if (!bytes) return conv::stream_auto_bytes();
        if (*bytes < 0)
          throw py::value_error("conv_stream_auto_bytes: bytes must be >= 0, got " + std::to_string(*bytes));
        return conv::set_stream_auto_bytes(*bytes);
      },
      py::arg("bytes") = py::none(),
      "Output bytes from which a forward that ConvPlan.streams_output marks streams its output (default 8 MiB "
      "where avx512_full_width(), as measured there, else 2**62: never); with `bytes` sets it (process-wide) and returns the previous value. For tests and "
      "benchmarks.");
  m.def("conv_streamed", [] { return conv::last_streamed(); },
        "Whether the last float forward or input gradient of ConvPlan this thread ran streamed its output "
        "(summed in scratch blocks, written with non-temporal stores). For tests and benchmarks.");
  m.def("conv_isa", [] { return std::string(isa_name(best_isa())); },
        "Instruction set the fused convolution kernels use on this CPU by default: 'avx512', 'avx2' or 'generic' "
        "(the widest that runs, or set_isa_limit's narrower one).");
  m.def(
      "set_isa_limit",
      [](py::object limit) -> py::object {
        const int before = isa_limit();
        const py::object previous = before < 0 ? py::object(py::none()) : py::object(py::str(isa_name(Isa(before))));
        if (limit.is_none()) {
          set_isa_limit(-1);
          return previous;
        }
        if (!py::isinstance<py::str>(limit))
          throw py::type_error("set_isa_limit: limit must be 'generic', 'avx2', 'avx512' or None; got a " +
                               std::string(py::str(py::type::of(limit).attr("__name__"))));
        const std::string name = limit.cast<std::string>();
        for (int i = 0; i < kNumIsas; ++i)
          if (name == isa_name(Isa(i))) {
            set_isa_limit(i);
            return previous;
          }
        throw py::value_error("set_isa_limit: limit must be 'generic', 'avx2', 'avx512' or None; got '" + name + "'");
      },
      py::arg("limit"),
      "Caps the instruction set every call without an `isa` of its own runs (conv_isa, spmm_isa) at `limit` "
      "('generic', 'avx2', 'avx512'; None: no cap), process-wide, and returns the previous cap. Below 'avx512' the bf16 kernels and AMX tiles "
      "are off (conv_bf16, conv_amx False) and avx512_full_width() is False: the engine runs as on a CPU "
      "without AVX-512. pointsparse calls it at import from POINTSPARSE_ISA; the engine's thresholds in "
      "nn._engine are read at import, so set it through that variable. For tests and benchmarks.");
  m.def("conv_bf16", [] { return conv::bf16_runs(); },
        "Whether the bf16 inference forward (AVX512-BF16 vdpbf16ps) runs on this CPU.");
  m.def("conv_amx", [] { return conv::bf16_tiles_run(); },
        "Whether the bf16 inference forward's AMX form (forward_bf16(tiles_width=...): AMX-TILE + AMX-BF16, with "
        "the OS's leave to use the tiles, asked on the first call) runs here.");
  m.def("avx512_full_width", [] { return avx512_full_width(); },
        "Whether the avx512 build runs on a CPU that executes 512-bit FMAs at full width (Intel; AMD from Zen 5, "
        "family 0x1A, not its laptop parts; AMD Zen 4: two 256-bit halves), or what set_avx512_full_width set: "
        "where the dense AVX-512 kernels gain most over the AVX2 vector-sparse kernels, so that the engine takes "
        "those at lower densities only (nn._engine.VECTOR_DENSITY), twin panels, and the AVX-512 vector kernels "
        "from one panel.");
  m.def("next_block_fetch", [] { return next_block_fetch(); },
        "Whether the vector-sparse and bf16 walks fetch the next block's opening rows into L2 during this one "
        "(on Intel CPUs, where it gained; not on AMD's, where it cost), or what set_next_block_fetch set.");
  m.def(
      "set_next_block_fetch",
      [](int value) {
        if (value < -1 || value > 1)
          throw py::value_error("set_next_block_fetch: value must be 1, 0 or -1 (the CPU's answer), got " +
                                std::to_string(value));
        set_next_block_fetch(value);
      },
      py::arg("value"), "Overrides next_block_fetch (1 or 0; -1: the CPU's answer again), process-wide: for "
      "tests and benchmarks (the outputs are the same bits either way).");
  m.def("avx512_full_width_detected", [] { return avx512_full_width_detected(); },
        "What the CPU answers to avx512_full_width, whatever set_avx512_full_width set.");
  m.def(
      "set_avx512_full_width",
      [](int value) {
        if (value < -1 || value > 1)
          throw py::value_error("set_avx512_full_width: value must be 1, 0 or -1 (the CPU's answer), got " +
                                std::to_string(value));
        if (value == 1 && !isa_runs(Isa::avx512))
          throw py::value_error("set_avx512_full_width: value 1 asks for the avx512 build, which does not run "
                                "here (it runs: " + runnable_isas() + ")");
        if (value == 1 && best_isa() != Isa::avx512)
          throw py::value_error(std::string("set_avx512_full_width: value 1 asks for the avx512 build, which the "
                                            "limit (POINTSPARSE_ISA, set_isa_limit) keeps at ") +
                                isa_name(best_isa()));
        set_avx512_full_width(value);
      },
      py::arg("value"),
      "Overrides avx512_full_width (1 or 0; -1: the CPU's answer again), process-wide. pointsparse calls it at "
      "import from POINTSPARSE_AVX512_FULL_WIDTH; the engine's thresholds in nn._engine are read at import, so "
      "set it through that variable (for benchmarks and tests comparing the two kinds of CPU on one).");
  m.def("runnable_isas", [] {
        std::vector<std::string> names;
        for (int i = kNumIsas - 1; i >= 0; --i)
          if (isa_runs(Isa(i))) names.push_back(isa_name(Isa(i)));
        return names;
      },
        "The kernel builds (conv and SpMM) this CPU runs, widest first: what an `isa` argument accepts.");
  py::class_<conv::Plan>(m, "ConvPlan",
                       "The pairs of a kernel map checked and laid out once for the fused convolution kernels.")
      .def(py::init(&make_plan),
           py::arg("in_idx"), py::arg("out_idx"), py::arg("ptr"), py::arg("num_in"), py::arg("num_out"),
           py::arg("identity"), py::arg("num_threads") = 1)
      .def("transposed", &conv::Plan::transposed,
           "The plan of the transposed map (inputs and outputs swapped), sharing this plan's pairs: no pass "
           "over them.")
      .def_property_readonly("num_in", &conv::Plan::num_in)
      .def_property_readonly("num_out", &conv::Plan::num_out)
      .def_property_readonly("kernel_volume", &conv::Plan::kernel_volume)
      .def_property_readonly("identity", &conv::Plan::identity)
      .def_property_readonly("num_pairs", &conv::Plan::num_pairs)
      .def("forward", &forward, py::arg("feats"), py::arg("weight"), py::arg("bias"), py::arg("out"),
           py::arg("num_threads"), py::arg("isa") = py::none(), py::arg("relu") = false,
           py::arg("active") = py::none(), py::arg("vector") = false, py::arg("add") = py::none(),
           "out = bias + sum over offsets o of feats[in_idx] @ weight[o] added at out_idx (bias None: zero). "
           "Writes every row of out. isa: None (the best build that runs here), 'generic', 'avx2' or 'avx512' "
           "(ValueError where it does not run); True/False: the former `portable` flag. relu: out = max(out, 0) "
           "in the kernel's epilogue (inference). active: None or K flags (uint8), the offsets run (the others' "
           "pairs are left out); vector: the vector-sparse kernels (only the weight rows of each column panel "
           "that hold a nonzero are visited; they run in the 32-byte builds). add: None or a residual of out's shape "
           "and dtype (C-contiguous, not sharing out's memory) added to out before the ReLU, block by block "
           "while the rows are in cache (a residual block's sum and ReLU in the conv's store).")
      .def(
          "streams_output",
          [](const conv::Plan& plan, py::object active, bool vector) {
            const conv::Skip skip = skip_of(plan, active, false);
            return conv::streams_output(plan, skip, false, vector);
          },
          py::arg("active") = py::none(), py::arg("vector") = false,
          "Whether forward(active=, vector=) marks its output to stream once it holds conv_stream_auto_bytes() "
          "bytes (whatever conv_stream_bytes() says): the dense kernels on a submanifold map whose identity "
          "offset active leaves out, running no more pairs than the map has output rows (offset pruning). "
          "Streamed in the avx512 build's float32 forward only (as measured); rows whose columns are not whole "
          "vectors of the build, or an output not at its vector boundary, are summed in place anyway "
          "(conv_streamed() says which way the last call went).")
      .def("forward_bf16", &forward_bf16, py::arg("feats"), py::arg("weight"), py::arg("bias"),
           py::arg("out"), py::arg("num_threads"), py::arg("relu") = false, py::arg("out_bf16") = py::none(),
           py::arg("vector_density") = -1.0, py::arg("add") = py::none(),
           py::arg("tiles_width") = std::numeric_limits<double>::infinity(),
           "Inference forward in bf16 (AVX512-BF16): feats and weight hold bf16 bits (int16/uint16 arrays), bias "
           "(float32 or None) and out float32; products summed in float32. out_bf16 (bf16 bits, out's shape, or "
           "None): out rounded to bf16 as torch rounds, block by block. out may be None where out_bf16 is given: "
           "the float32 sums are then kept block by block only. Offsets whose weight is all zero are "
           "skipped; where at most vector_density (negative: never) of the kept offsets' bf16 vectors (offset, "
           "channel pair, 16 output columns) hold a nonzero, only those run. add: None or a bf16 residual "
           "(bf16 bits, out's shape) added in float32 before the ReLU. tiles_width: where the CPU runs AMX-BF16 "
           "(conv_amx()) and the listed width (the density of listed vectors x sqrt(C_in x C_out)) is at least "
           "tiles_width, every kept offset runs on the AMX tiles (16 pairs x 16 columns a tile, summed from zero "
           "in float32, then added to the row); infinite (default): never. Returns what ran: 'dense', 'offsets', "
           "'vector' or 'tiles'. ValueError where the CPU lacks AVX512-BF16.")
      .def("backward_input", &backward_input, py::arg("grad"), py::arg("weight"), py::arg("grad_feats"),
           py::arg("num_threads"), py::arg("isa") = py::none(), py::arg("active") = py::none(),
           py::arg("vector") = false,
           "grad_feats = sum over offsets o of grad[out_idx] @ weight[o].T added at in_idx. Writes every row. "
           "isa, active, vector: as in forward.")
      .def("backward_weight", &backward_weight, py::arg("feats"), py::arg("grad"),
           py::arg("grad_weight"), py::arg("num_threads"), py::arg("isa") = py::none(),
           py::arg("active") = py::none(), py::arg("mask") = py::none(),
           "grad_weight[o] = feats[in_idx].T @ grad[out_idx] for every offset o. Writes all of grad_weight: zero "
           "for an offset active leaves out and, with mask (K, C_in, C_out), for every vector (offset, input "
           "channel, panel of 16 float32 / 8 float64 columns) where the mask is all zero; the entries computed "
           "equal the dense ones bit for bit.");
}

}  // namespace ps
