// The element-wise losses: kl_div (log-probability input) and
// binary_cross_entropy_with_logits. Any shape; operands may be strided, of any float dtype,
// and (weight, pos_weight) broadcast NumPy-style.
//
// The input is walked as lines along its last dimension, each cut into segments of at most
// kSegment elements: a segment is the unit of threading and of the partial sums, which are
// added in segment order, so the result does not depend on the thread count. The reduction
// (reduce_plan, gradient_coef, reduce_total) is the row driver's (row_driver.hpp).
#include <softce/softce.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "kernels.hpp"
#include "row_driver.hpp"
#include "staging.hpp"
#include "threading.hpp"
#include "validate.hpp"

namespace softce {
using namespace detail;

namespace {

constexpr std::int64_t kSegment = 8192;

// An operand with strides aligned to the input's dimensions (0 where broadcast).
struct aligned_operand {
  const char* base = nullptr;
  dtype type = dtype::float32;
  std::int64_t strides[max_dims] = {};
};

aligned_operand align_same_shape(const array_view& v) {
  aligned_operand op;
  op.base = static_cast<const char*>(v.data);
  op.type = v.type;
  for (int i = 0; i < v.ndim; ++i) op.strides[i] = v.strides[i];
  return op;
}

aligned_operand align_broadcast(std::string_view fn, std::string_view arg, const array_view& v,
                                const array_view& input) {
  check_float(fn, arg, v);
  aligned_operand op;
  op.base = static_cast<const char*>(v.data);
  op.type = v.type;
  bool ok = v.ndim <= input.ndim;
  for (int i = 0; ok && i < v.ndim; ++i) {
    const int j = input.ndim - v.ndim + i;  // right-aligned
    if (v.shape[i] == input.shape[j])
      op.strides[j] = input.shape[j] == 1 ? 0 : v.strides[i];
    else if (v.shape[i] == 1)
      op.strides[j] = 0;
    else
      ok = false;
  }
  if (!ok)
    fail(fn, arg, "expected a shape broadcastable to " + shape_string(input) + " (the input's), got " +
                      shape_string(v));
  return op;
}

struct line_walker {
  int ndim;
  std::int64_t shape[max_dims] = {};
  std::int64_t line_length, lines, segments_per_line;

  explicit line_walker(const array_view& input) : ndim(input.ndim) {
    for (int i = 0; i < ndim; ++i) shape[i] = input.shape[i];
    line_length = ndim == 0 ? 1 : shape[ndim - 1];
    lines = 1;
    for (int i = 0; i + 1 < ndim; ++i) lines *= shape[i];
    if (line_length == 0) lines = 0;
    segments_per_line = line_length == 0 ? 0 : (line_length + kSegment - 1) / kSegment;
  }
  std::int64_t offset(const aligned_operand& op, std::int64_t line) const {
    std::int64_t off = 0;
    for (int d = ndim - 2; d >= 0; --d) {
      off += (line % shape[d]) * op.strides[d];
      line /= shape[d];
    }
    return off;
  }
  std::int64_t inner_stride(const aligned_operand& op) const { return ndim == 0 ? 1 : op.strides[ndim - 1]; }
};

// Segment reader: a direct pointer when the operand is contiguous in the compute type.
template <class T>
const T* read_segment(const line_walker& lw, const aligned_operand& op, std::int64_t line, std::int64_t start,
                      std::int64_t count, std::vector<T>& buffer, const half_kernel_table* half) {
  const std::int64_t stride = lw.inner_stride(op);
  const std::int64_t off = lw.offset(op, line) + start * stride;
  if (op.type == dtype_of<T>() && stride == 1) return reinterpret_cast<const T*>(op.base) + off;
  buffer.resize(static_cast<std::size_t>(count));
  gather<T>(op.base, op.type, off, stride, count, buffer.data(), half);
  return buffer.data();
}

template <class T>
struct segment_writer {
  const line_walker* lw;
  const aligned_operand* op;
  const half_kernel_table* half;
  std::vector<T> buffer;
  std::int64_t off = 0, stride = 0, count = 0;
  bool direct = false;
  T* begin(std::int64_t line, std::int64_t start, std::int64_t n) {
    stride = lw->inner_stride(*op);
    off = lw->offset(*op, line) + start * stride;
    count = n;
    direct = op->type == dtype_of<T>() && stride == 1;
    if (direct) return const_cast<T*>(reinterpret_cast<const T*>(op->base)) + off;
    buffer.resize(static_cast<std::size_t>(n));
    return buffer.data();
  }
  void commit() {
    if (!direct) scatter<T>(buffer.data(), count, const_cast<char*>(op->base), op->type, off, stride, half);
  }
};

// Runs `kernel(x, t, w, pw, n, g, losses) -> Σ loss` over every segment, and with `gt`
// first `target_grad(x, t, w, pw, n, gt)` on the same segment (before an in-place gradient
// overwrites x).
template <class T, class Kernel, class TargetGrad>
double run_segments(const array_view& input, const aligned_operand& x, const aligned_operand& t,
                    const aligned_operand* w, const aligned_operand* pw, const aligned_operand* g,
                    const aligned_operand* losses, const aligned_operand* gt, Kernel kernel,
                    TargetGrad target_grad) {
  const line_walker lw(input);
  const std::int64_t units = lw.lines * lw.segments_per_line;
  std::vector<double> partial(static_cast<std::size_t>(units), 0.0);
  const half_kernel_table* half = &kernels().half;  // once per call, not per segment
  parallel_for(units, grain_for(std::min(lw.line_length, kSegment)), [&](std::int64_t begin, std::int64_t end) {
    std::vector<T> bx, bt, bw, bpw;
    segment_writer<T> gw{&lw, g, half, {}}, lw_out{&lw, losses, half, {}}, gtw{&lw, gt, half, {}};
    for (std::int64_t u = begin; u < end; ++u) {
      const std::int64_t line = u / lw.segments_per_line;
      const std::int64_t start = (u % lw.segments_per_line) * kSegment;
      const std::int64_t n = std::min(kSegment, lw.line_length - start);
      const T* xs = read_segment<T>(lw, x, line, start, n, bx, half);
      const T* ts = read_segment<T>(lw, t, line, start, n, bt, half);
      const T* ws = w ? read_segment<T>(lw, *w, line, start, n, bw, half) : nullptr;
      const T* pws = pw ? read_segment<T>(lw, *pw, line, start, n, bpw, half) : nullptr;
      if (gt) {
        target_grad(xs, ts, ws, pws, n, gtw.begin(line, start, n));
        gtw.commit();
      }
      T* gs = g ? gw.begin(line, start, n) : nullptr;
      T* ls = losses ? lw_out.begin(line, start, n) : nullptr;
      partial[static_cast<std::size_t>(u)] = kernel(xs, ts, ws, pws, n, gs, ls);
      if (g) gw.commit();
      if (losses) lw_out.commit();
    }
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

template <class T>
double kl_div_impl(const array_view& input, const array_view& target, const kl_div_options& opt,
                   const outputs& out) {
  const kernel_table<T>& kern = kernels_for<T>();
  const double numel = static_cast<double>(input.numel());
  const reduce_plan plan{opt.reduce, opt.reduce == reduction::batchmean
                                         ? (input.ndim == 0 ? 1.0 : static_cast<double>(input.shape[0]))
                                         : numel};
  const T coef = static_cast<T>(gradient_coef(plan));
  const aligned_operand x = align_same_shape(input), t = align_same_shape(target);
  aligned_operand g, l, gt;
  if (out.grad) g = align_same_shape(*out.grad);
  if (out.losses) l = align_same_shape(*out.losses);
  if (out.grad_target) gt = align_same_shape(*out.grad_target);
  const bool log_target = opt.log_target;
  const double total = run_segments<T>(
      input, x, t, nullptr, nullptr, out.grad ? &g : nullptr, out.losses ? &l : nullptr,
      out.grad_target ? &gt : nullptr,
      [&](const T* xs, const T* ts, const T*, const T*, std::int64_t n, T* gs, T* ls) {
        return kern.kl_div_elements(xs, ts, n, log_target, coef, gs, ls);
      },
      // d/dt: log t + 1 - x (NaN at t = 0, as torch's xlogy(t, t)); log_target:
      // e^t (t - x + 1), 0 at t = -inf
      [&](const T* xs, const T* ts, const T*, const T*, std::int64_t n, T* gts) {
        for (std::int64_t i = 0; i < n; ++i) {
          const double xi = xs[i], ti = ts[i];
          double d;
          if (log_target)
            d = ti == -std::numeric_limits<double>::infinity() ? 0.0 : std::exp(ti) * (ti - xi + 1.0);
          else
            d = ti == 0.0 ? std::numeric_limits<double>::quiet_NaN() : std::log(ti) + 1.0 - xi;
          gts[i] = static_cast<T>(static_cast<double>(coef) * d);
        }
      });
  return reduce_total(total, plan);
}

// d loss / d t of BCE, pos_weight softplus(-x) - softplus(x), without rounding its linear
// part: (pos_weight - 1) log1p(exp(-|x|)) + (x >= 0 ? -x : -pos_weight x). At an infinite
// logit a term whose coefficient is zero (a = pos_weight t at x = -inf, b = 1 - t at
// x = +inf) is 0 with its gradient: the masked-logit rule (docs/semantics.md), under which
// cross_entropy's target gradient at a masked class is 0 too.
double bce_target_gradient(double x, double t, double pos_weight) {
  constexpr double inf = std::numeric_limits<double>::infinity();
  if (x == -inf) return pos_weight * t == 0 ? 0.0 : pos_weight * inf;
  if (x == inf) return (t == 1 ? 0.0 : -inf) + pos_weight * 0.0;  // pos_weight softplus(-inf): NaN stays
  if (pos_weight == 1) return -x;
  return (pos_weight - 1) * std::log1p(std::exp(-std::fabs(x))) + (x >= 0 ? -x : -pos_weight * x);
}

template <class T>
double bce_impl(const array_view& input, const array_view& target, const bce_options& opt, const outputs& out) {
  const kernel_table<T>& kern = kernels_for<T>();
  constexpr std::string_view fn = "binary_cross_entropy_with_logits";
  const reduce_plan plan{opt.reduce, static_cast<double>(input.numel())};
  const T coef = static_cast<T>(gradient_coef(plan));
  const aligned_operand x = align_same_shape(input), t = align_same_shape(target);
  std::optional<aligned_operand> w, pw;
  if (opt.weight) w = align_broadcast(fn, "weight", *opt.weight, input);
  if (opt.pos_weight) pw = align_broadcast(fn, "pos_weight", *opt.pos_weight, input);
  aligned_operand g, l, gt;
  if (out.grad) g = align_same_shape(*out.grad);
  if (out.losses) l = align_same_shape(*out.losses);
  if (out.grad_target) gt = align_same_shape(*out.grad_target);
  const double total = run_segments<T>(
      input, x, t, w ? &*w : nullptr, pw ? &*pw : nullptr, out.grad ? &g : nullptr, out.losses ? &l : nullptr,
      out.grad_target ? &gt : nullptr,
      [&](const T* xs, const T* ts, const T* ws, const T* pws, std::int64_t n, T* gs, T* ls) {
        return kern.bce_elements(xs, ts, ws, pws, n, coef, gs, ls);
      },
      // d/dt: w (pos_weight softplus(-x) - softplus(x))
      [&](const T* xs, const T* ts, const T* ws, const T* pws, std::int64_t n, T* gts) {
        for (std::int64_t i = 0; i < n; ++i) {
          double d = bce_target_gradient(xs[i], ts[i], pws ? static_cast<double>(pws[i]) : 1.0);
          if (ws) d *= static_cast<double>(ws[i]);
          gts[i] = static_cast<T>(static_cast<double>(coef) * d);
        }
      });
  return reduce_total(total, plan);
}

void check_elementwise(std::string_view fn, const array_view& input, const array_view& target, const outputs& out,
                       reduction r, const std::optional<array_view>& weight = std::nullopt,
                       const std::optional<array_view>& pos_weight = std::nullopt) {
  check_float(fn, "input", input);
  check_float(fn, "target", target);
  check_same_shape(fn, "target", target, input, "input");
  check_outputs(fn, out, input, input.shape, input.ndim, r);
  check_aliasing(fn, out, {{"target", target}, {"weight", weight}, {"pos_weight", pos_weight}});
  check_grad_target(fn, out, &target, "target");
}

}  // namespace

double kl_div(const array_view& input, const array_view& target, const kl_div_options& options, const outputs& out) {
  constexpr std::string_view fn = "kl_div";
  check_reduction(fn, options.reduce, {reduction::none, reduction::mean, reduction::sum, reduction::batchmean});
  check_elementwise(fn, input, target, out, options.reduce);
  return input.type == dtype::float64 ? kl_div_impl<double>(input, target, options, out)
                                      : kl_div_impl<float>(input, target, options, out);
}

double binary_cross_entropy_with_logits(const array_view& input, const array_view& target, const bce_options& options,
                                        const outputs& out) {
  constexpr std::string_view fn = "binary_cross_entropy_with_logits";
  check_reduction(fn, options.reduce, {reduction::none, reduction::mean, reduction::sum});
  check_elementwise(fn, input, target, out, options.reduce, options.weight, options.pos_weight);
  return input.type == dtype::float64 ? bce_impl<double>(input, target, options, out)
                                      : bce_impl<float>(input, target, options, out);
}

}  // namespace softce
