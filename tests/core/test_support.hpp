// Shared helpers of the core tests: tensors materialised in any dtype and memory layout
// (padded, permuted, negative strides), random data, and comparison of a fast softce call
// with the reference oracle (tests/oracle/reference.hpp) on separate copies of the same inputs.
#pragma once

#include <softce/class_parallel.hpp>
#include <softce/softce.hpp>

#include "reference.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <iomanip>
#include <limits>
#include <numeric>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace softce_test {

using softce::array_view;
using softce::dtype;
using softce::mutable_array_view;
using shape_t = std::vector<std::int64_t>;

inline constexpr double inf = std::numeric_limits<double>::infinity();
inline constexpr double nan = std::numeric_limits<double>::quiet_NaN();

inline std::int64_t size_of(dtype t) {
  switch (t) {
    case dtype::float32: case dtype::int32: return 4;
    case dtype::float64: case dtype::int64: return 8;
    case dtype::bfloat16: case dtype::float16: return 2;
    case dtype::boolean: return 1;
  }
  return 1;
}

inline const char* name_of(dtype t) {
  switch (t) {
    case dtype::float32: return "float32";
    case dtype::float64: return "float64";
    case dtype::bfloat16: return "bfloat16";
    case dtype::float16: return "float16";
    case dtype::int32: return "int32";
    case dtype::int64: return "int64";
    case dtype::boolean: return "bool";
  }
  return "?";
}

inline std::int64_t product(const shape_t& s) {
  std::int64_t n = 1;
  for (auto e : s) n *= e;
  return n;
}

inline std::string shape_text(const shape_t& s) {
  std::string t = "(";
  for (std::size_t i = 0; i < s.size(); ++i) t += (i ? ", " : "") + std::to_string(s[i]);
  return t + ")";
}

// ---------------------------------------------------------------------------------------
// memory layouts

// How a tensor is placed in memory: dimensions stored in `order` (outermost first), each
// dimension followed by `gap[d]` unused elements, the innermost dimension spaced by
// `spacing`, and dimensions with `flip[d]` walked backwards (negative stride).
struct layout {
  std::vector<int> order;
  std::vector<std::int64_t> gap;
  std::vector<bool> flip;
  std::int64_t spacing = 1;

  bool contiguous() const {
    for (std::size_t i = 0; i < order.size(); ++i)
      if (order[i] != static_cast<int>(i)) return false;
    for (auto g : gap) if (g) return false;
    for (bool f : flip) if (f) return false;
    return spacing == 1;
  }
  std::string describe() const {
    if (contiguous()) return "contiguous";
    std::ostringstream s;
    s << "order[";
    for (int d : order) s << d;
    s << "] gap[";
    for (auto g : gap) s << g << ",";
    s << "] flip[";
    for (bool f : flip) s << (f ? 1 : 0);
    s << "] spacing " << spacing;
    return s.str();
  }
};

inline layout row_major(int ndim) {
  layout l;
  l.order.resize(ndim);
  std::iota(l.order.begin(), l.order.end(), 0);
  l.gap.assign(ndim, 0);
  l.flip.assign(ndim, false);
  return l;
}

// A random non-contiguous layout (or, one time in four, the contiguous one).
inline layout random_layout(std::mt19937_64& rng, int ndim) {
  layout l = row_major(ndim);
  if (ndim == 0 || rng() % 4 == 0) return l;
  switch (rng() % 5) {
    case 0:  // padded rows
      for (int d = 0; d < ndim; ++d) l.gap[d] = rng() % 2 ? static_cast<std::int64_t>(rng() % 5 + 1) : 0;
      break;
    case 1:  // permuted (e.g. column-major)
      std::shuffle(l.order.begin(), l.order.end(), rng);
      break;
    case 2:  // negative strides
      for (int d = 0; d < ndim; ++d) l.flip[d] = rng() % 2;
      break;
    case 3:  // interleaved
      l.spacing = 2 + static_cast<std::int64_t>(rng() % 2);
      break;
    default:  // everything at once
      std::shuffle(l.order.begin(), l.order.end(), rng);
      for (int d = 0; d < ndim; ++d) {
        l.gap[d] = static_cast<std::int64_t>(rng() % 3);
        l.flip[d] = rng() % 2;
      }
      l.spacing = 1 + static_cast<std::int64_t>(rng() % 2);
  }
  return l;
}

// ---------------------------------------------------------------------------------------
// tensors

// A logical tensor of `shape` stored with a dtype and layout. Bytes outside the elements
// are filled with 0xFF (NaN for every float dtype), so reading them shows up as NaN and
// writing them is detected by padding_intact().
class tensor {
 public:
  tensor() = default;
  tensor(shape_t shape, dtype type, const layout& l = {}) : shape_(std::move(shape)), type_(type) {
    const int ndim = static_cast<int>(shape_.size());
    layout lay = l.order.empty() ? row_major(ndim) : l;
    strides_.assign(ndim, 0);
    std::int64_t running = lay.spacing;
    for (int k = ndim - 1; k >= 0; --k) {
      const int d = lay.order[k];
      strides_[d] = running;
      running = running * std::max<std::int64_t>(shape_[d], 1) + lay.gap[d];
    }
    base_ = 0;
    for (int d = 0; d < ndim; ++d)
      if (lay.flip[d]) {
        base_ += (std::max<std::int64_t>(shape_[d], 1) - 1) * strides_[d];
        strides_[d] = -strides_[d];
      }
    bytes_.assign(static_cast<std::size_t>(std::max<std::int64_t>(running, 1) * size_of(type)), 0xFF);
    description_ = std::string(name_of(type)) + shape_text(shape_) + " " + lay.describe();
    dense_ = lay.contiguous();
    if (dense_) return;  // no padding: element i is at offset i
    is_element_.assign(bytes_.size(), false);
    std::vector<std::int64_t> index(ndim);
    for (std::int64_t i = 0; i < numel(); ++i) {
      unravel(i, index.data());
      const std::int64_t byte = (base_ + offset(index.data())) * size_of(type);
      for (std::int64_t b = 0; b < size_of(type); ++b) is_element_[byte + b] = true;
    }
  }

  const shape_t& shape() const { return shape_; }
  dtype type() const { return type_; }
  std::int64_t numel() const { return product(shape_); }
  int ndim() const { return static_cast<int>(shape_.size()); }
  const std::string& describe() const { return description_; }

  array_view view() const {
    array_view v;
    v.data = bytes_.data() + base_ * size_of(type_);
    fill(v);
    return v;
  }
  mutable_array_view mutable_view() {
    mutable_array_view v;
    v.data = bytes_.data() + base_ * size_of(type_);
    fill(v);
    return v;
  }

  // Values in row-major logical order (rounded to the dtype on store).
  void set(const std::vector<double>& values) {
    if (dense_) {
      const mutable_array_view flat = flat_view();
      for (std::int64_t i = 0; i < numel(); ++i) softce::reference::store(flat, &i, values[i]);
      return;
    }
    std::vector<std::int64_t> index(ndim());
    const mutable_array_view v = mutable_view();
    for (std::int64_t i = 0; i < numel(); ++i) {
      unravel(i, index.data());
      softce::reference::store(v, index.data(), values[i]);
    }
  }
  std::vector<double> values() const {
    std::vector<double> out(static_cast<std::size_t>(numel()));
    if (dense_) {
      const array_view flat = const_cast<tensor*>(this)->flat_view();
      for (std::int64_t i = 0; i < numel(); ++i) out[i] = softce::reference::load(flat, &i);
      return out;
    }
    std::vector<std::int64_t> index(ndim());
    const array_view v = view();
    for (std::int64_t i = 0; i < numel(); ++i) {
      unravel(i, index.data());
      out[i] = softce::reference::load(v, index.data());
    }
    return out;
  }
  void set_integers(const std::vector<std::int64_t>& values) {
    std::vector<std::int64_t> index(ndim());
    for (std::int64_t i = 0; i < numel(); ++i) {
      unravel(i, index.data());
      char* p = reinterpret_cast<char*>(bytes_.data()) + (base_ + offset(index.data())) * size_of(type_);
      if (type_ == dtype::int32) {
        const auto x = static_cast<std::int32_t>(values[i]);
        std::memcpy(p, &x, 4);
      } else if (type_ == dtype::int64) {
        std::memcpy(p, &values[i], 8);
      } else {
        const unsigned char b = values[i] != 0;
        std::memcpy(p, &b, 1);
      }
    }
  }
  // The raw bytes of every element in logical order (for bitwise comparisons).
  std::vector<unsigned char> element_bytes() const {
    if (dense_) return std::vector<unsigned char>(bytes_.begin(), bytes_.begin() + numel() * size_of(type_));
    std::vector<unsigned char> out;
    std::vector<std::int64_t> index(ndim());
    for (std::int64_t i = 0; i < numel(); ++i) {
      unravel(i, index.data());
      const auto* p = bytes_.data() + (base_ + offset(index.data())) * size_of(type_);
      out.insert(out.end(), p, p + size_of(type_));
    }
    return out;
  }
  bool padding_intact() const {
    if (dense_) return true;
    for (std::size_t b = 0; b < bytes_.size(); ++b)
      if (!is_element_[b] && bytes_[b] != 0xFF) return false;
    return true;
  }

  void unravel(std::int64_t i, std::int64_t* index) const {
    for (int d = ndim() - 1; d >= 0; --d) {
      index[d] = i % shape_[d];
      i /= shape_[d];
    }
  }

 private:
  mutable_array_view flat_view() {
    mutable_array_view v;
    v.data = bytes_.data();
    v.type = type_;
    v.ndim = 1;
    v.shape[0] = numel();
    v.strides[0] = 1;
    return v;
  }
  std::int64_t offset(const std::int64_t* index) const {
    std::int64_t o = 0;
    for (int d = 0; d < ndim(); ++d) o += index[d] * strides_[d];
    return o;
  }
  template <class View>
  void fill(View& v) const {
    v.type = type_;
    v.ndim = ndim();
    for (int d = 0; d < ndim(); ++d) {
      v.shape[d] = shape_[d];
      v.strides[d] = strides_[d];
    }
  }

  shape_t shape_;
  dtype type_ = dtype::float32;
  std::vector<std::int64_t> strides_;
  std::int64_t base_ = 0;
  std::vector<unsigned char> bytes_;
  std::vector<bool> is_element_;
  bool dense_ = false;
  std::string description_;
};

inline tensor make_tensor(const shape_t& shape, dtype type, const std::vector<double>& values,
                          const layout& l = {}) {
  tensor t(shape, type, l);
  t.set(values);
  return t;
}

inline tensor make_index_tensor(const shape_t& shape, dtype type,
                                const std::vector<std::int64_t>& values, const layout& l = {}) {
  tensor t(shape, type, l);
  t.set_integers(values);
  return t;
}

// ---------------------------------------------------------------------------------------
// shapes and random data

// The row shape of logits: (C,) -> (), (N, C, d...) -> (N, d...).
inline shape_t row_shape_of(const shape_t& logits) {
  if (logits.size() <= 1) return {};
  shape_t r{logits[0]};
  for (std::size_t d = 2; d < logits.size(); ++d) r.push_back(logits[d]);
  return r;
}
inline std::int64_t classes_of(const shape_t& logits) {
  return logits.size() == 1 ? logits[0] : logits[1];
}
// Flat row-major index of element (row r, class c) of a logits tensor.
inline std::int64_t flat_index(const shape_t& logits, std::int64_t r, std::int64_t c) {
  if (logits.size() == 1) return c;
  std::int64_t inner = 1;
  for (std::size_t d = 2; d < logits.size(); ++d) inner *= logits[d];
  const std::int64_t n = r / inner, rest = r % inner;
  return (n * logits[1] + c) * inner + rest;
}

inline std::vector<double> normal_values(std::mt19937_64& rng, std::int64_t count, double scale = 1,
                                         double shift = 0) {
  std::normal_distribution<double> normal(0, 1);
  std::vector<double> v(static_cast<std::size_t>(count));
  for (auto& x : v) x = shift + scale * normal(rng);
  return v;
}

inline std::vector<double> uniform_values(std::mt19937_64& rng, std::int64_t count, double lo, double hi) {
  std::uniform_real_distribution<double> u(lo, hi);
  std::vector<double> v(static_cast<std::size_t>(count));
  for (auto& x : v) x = u(rng);
  return v;
}

// Kinds of probability-target rows.
enum class target_rows { normalised, with_zeros, unnormalised, mixed };

// Random targets for logits of `shape`: per row a softmax of random values, with some
// exact zeros / scaled / all-zero rows depending on `kind`.
inline std::vector<double> probability_targets(std::mt19937_64& rng, const shape_t& shape,
                                               target_rows kind = target_rows::mixed) {
  const std::int64_t C = classes_of(shape);
  const std::int64_t rows = product(row_shape_of(shape));
  std::vector<double> t(static_cast<std::size_t>(product(shape)));
  std::normal_distribution<double> normal(0, 1.5);
  std::uniform_real_distribution<double> unit(0, 1);
  for (std::int64_t r = 0; r < rows; ++r) {
    target_rows k = kind;
    if (k == target_rows::mixed) {
      const auto pick = rng() % 8;
      k = pick < 4 ? target_rows::normalised : pick < 7 ? target_rows::with_zeros : target_rows::unnormalised;
    }
    std::vector<double> row(static_cast<std::size_t>(C));
    double sum = 0;
    for (auto& x : row) {
      x = std::exp(normal(rng));
      if (k == target_rows::with_zeros && unit(rng) < 0.4) x = 0;
      sum += x;
    }
    double scale = sum > 0 ? 1 / sum : 0;
    if (k == target_rows::unnormalised) scale *= rng() % 5 == 0 ? 0 : 0.3 + 1.5 * unit(rng);
    for (std::int64_t c = 0; c < C; ++c) t[flat_index(shape, r, c)] = row[c] * scale;
  }
  return t;
}

// log_softmax of random logits along the class dimension (kl_div inputs).
inline std::vector<double> log_softmax_rows(const std::vector<double>& x, const shape_t& shape) {
  const std::int64_t C = classes_of(shape);
  const std::int64_t rows = product(row_shape_of(shape));
  std::vector<double> out(x.size());
  for (std::int64_t r = 0; r < rows; ++r) {
    double m = -inf;
    for (std::int64_t c = 0; c < C; ++c) m = std::max(m, x[flat_index(shape, r, c)]);
    double s = 0;
    for (std::int64_t c = 0; c < C; ++c) s += std::exp(x[flat_index(shape, r, c)] - m);
    for (std::int64_t c = 0; c < C; ++c)
      out[flat_index(shape, r, c)] = x[flat_index(shape, r, c)] - m - std::log(s);
  }
  return out;
}

// Random top-k: per row K distinct class ids and probabilities summing to `mass` (< 1 leaves
// a tail), rows of shape (row shape..., K).
struct topk_data {
  std::vector<std::int64_t> indices;
  std::vector<double> values;
  shape_t shape;
};

inline topk_data random_topk(std::mt19937_64& rng, const shape_t& logits, std::int64_t K,
                             bool full_mass) {
  const std::int64_t C = classes_of(logits);
  const shape_t rs = row_shape_of(logits);
  const std::int64_t rows = product(rs);
  topk_data d;
  d.shape = rs;
  d.shape.push_back(K);
  std::uniform_real_distribution<double> unit(0, 1);
  std::vector<std::int64_t> ids(static_cast<std::size_t>(C));
  for (std::int64_t r = 0; r < rows; ++r) {
    std::iota(ids.begin(), ids.end(), 0);
    // partial Fisher-Yates: the first K are a random K-subset
    for (std::int64_t j = 0; j < K; ++j) {
      const std::int64_t pick = j + static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(C - j));
      std::swap(ids[j], ids[pick]);
    }
    std::vector<double> v(static_cast<std::size_t>(K));
    double sum = 0;
    for (auto& x : v) sum += x = std::exp(2 * unit(rng));
    const double mass = full_mass ? 1.0 : 0.3 + 0.65 * unit(rng);
    for (std::int64_t j = 0; j < K; ++j) {
      d.indices.push_back(ids[j]);
      d.values.push_back(v[j] / sum * mass);
    }
  }
  return d;
}

// ---------------------------------------------------------------------------------------
// comparisons

// Tolerances: |fast - ref| <= rtol * scale + elem_rtol * |ref| + atol, where `scale` is the
// largest |ref| (per array) or |ref| itself (for a single loss).
struct tolerance {
  double rtol = 1e-5;
  double elem_rtol = 0;
  double atol = 0;
};

// Relative rounding unit of a dtype (one unit in the last place, relative).
inline double unit_roundoff(dtype t) {
  switch (t) {
    case dtype::float64: return 0x1p-52;
    case dtype::float32: return 0x1p-23;
    case dtype::bfloat16: return 0x1p-7;
    case dtype::float16: return 0x1p-10;
    default: return 0;
  }
}

// The arithmetic precision of the fast kernels for an input dtype: float64 in float64,
// everything else in float32.
inline double compute_rtol(dtype input) { return input == dtype::float64 ? 1e-12 : 1e-5; }

// Loss tolerance for an input dtype.
// A loss that should be 0 may come out as a few roundings of its terms: a tiny atol.
inline tolerance loss_tolerance(dtype input) { return {compute_rtol(input), 0, compute_rtol(input) * 0.1}; }

// Tolerance for an array output of dtype `out` computed from an input of dtype `input`:
// relative to the largest element, plus one rounding of the output dtype per element.
inline tolerance array_tolerance(dtype input, dtype out) {
  tolerance t;
  t.rtol = compute_rtol(input);
  t.elem_rtol = out == dtype::float64 ? 0 : unit_roundoff(out);
  t.atol = out == dtype::float16 ? 0x1p-24 : 1e-300;
  return t;
}

inline bool same_special(double a, double b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  if (std::isinf(a) || std::isinf(b)) return a == b;
  return false;
}

inline ::testing::AssertionResult loss_near(double fast, double ref, const tolerance& tol) {
  if (std::isnan(fast) || std::isnan(ref) || std::isinf(fast) || std::isinf(ref)) {
    if (same_special(fast, ref)) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "fast " << fast << " vs reference " << ref;
  }
  const double bound = tol.rtol * std::fabs(ref) + tol.elem_rtol * std::fabs(ref) + tol.atol;
  if (std::fabs(fast - ref) <= bound) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << std::setprecision(17) << "fast " << fast << " vs reference " << ref << ": difference "
         << std::fabs(fast - ref) << " > " << bound << " (relative "
         << std::fabs(fast - ref) / std::fabs(ref) << ")";
}

inline ::testing::AssertionResult values_near(const std::vector<double>& fast,
                                              const std::vector<double>& ref,
                                              const tolerance& tol, const char* what = "values") {
  if (fast.size() != ref.size())
    return ::testing::AssertionFailure() << what << ": sizes differ";
  double scale = 0;
  for (double r : ref)
    if (std::isfinite(r)) scale = std::max(scale, std::fabs(r));
  int bad = 0;
  std::ostringstream msg;
  msg << std::setprecision(10);
  double worst = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const double f = fast[i], r = ref[i];
    bool ok;
    if (!std::isfinite(f) || !std::isfinite(r)) {
      ok = same_special(f, r);
    } else {
      const double bound = tol.rtol * scale + tol.elem_rtol * std::fabs(r) + tol.atol;
      ok = std::fabs(f - r) <= bound;
      if (!ok) worst = std::max(worst, std::fabs(f - r) / std::max(scale, 1e-300));
    }
    if (!ok && ++bad <= 5) msg << "\n  [" << i << "] fast " << f << " reference " << r;
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << ": " << bad << " of " << ref.size()
                                       << " elements differ (largest |diff| / max|ref| = " << worst
                                       << ", max|ref| = " << scale << ")" << msg.str();
}

// The gradient factor of a reduction: 1/denominator for the averaging ones, else 1.
inline double reduction_coef(softce::reduction r, double denominator) {
  if (r == softce::reduction::mean || r == softce::reduction::batchmean) return denominator > 0 ? 1 / denominator : 0;
  return 1;
}

inline double max_abs(const std::vector<double>& v, double floor = 0) {
  double m = floor;
  for (double x : v)
    if (std::isfinite(x)) m = std::max(m, std::fabs(x));
  return m;
}

inline bool has_nan(const std::vector<double>& v) {
  return std::any_of(v.begin(), v.end(), [](double x) { return std::isnan(x); });
}

// ---------------------------------------------------------------------------------------
// running a fast call and the reference side by side

// What to ask for besides the loss.
struct output_request {
  bool grad = false;
  dtype grad_type = dtype::float32;
  layout grad_layout;
  bool in_place = false;  // grad written over (a copy of) the input
  bool losses = false;
  dtype losses_type = dtype::float64;
  layout losses_layout;
  shape_t losses_shape;

  std::string describe() const {
    std::string s;
    if (grad)
      s += in_place ? std::string(" grad in place") : std::string(" grad ") + name_of(grad_type) + " " + grad_layout.describe();
    if (losses) s += std::string(" losses ") + name_of(losses_type) + " " + losses_layout.describe();
    return s;
  }
};

struct call_result {
  double loss = 0;
  std::vector<double> grad;
  std::vector<double> losses;
  std::vector<unsigned char> grad_bytes;
  std::vector<unsigned char> losses_bytes;
};

using loss_call = std::function<double(const array_view& input, const softce::outputs& out)>;

// Runs `call` on a private copy of `input` with fresh output buffers as requested; checks
// that the input is left alone (unless in place) and that no byte outside an output's
// elements is written.
inline call_result run_call(const loss_call& call, const tensor& input, const output_request& req) {
  tensor in = input;
  tensor grad, losses;
  softce::outputs out;
  if (req.grad) {
    if (req.in_place) {
      out.grad = in.mutable_view();
    } else {
      grad = tensor(input.shape(), req.grad_type, req.grad_layout);
      out.grad = grad.mutable_view();
    }
  }
  if (req.losses) {
    losses = tensor(req.losses_shape, req.losses_type, req.losses_layout);
    out.losses = losses.mutable_view();
  }
  call_result r;
  r.loss = call(in.view(), out);
  if (req.grad) {
    const tensor& g = req.in_place ? in : grad;
    r.grad = g.values();
    r.grad_bytes = g.element_bytes();
    EXPECT_TRUE(g.padding_intact()) << "grad: bytes outside the elements were written";
  }
  if (!(req.grad && req.in_place)) {
    EXPECT_EQ(in.element_bytes(), input.element_bytes()) << "the input was modified";
  }
  if (req.losses) {
    r.losses = losses.values();
    r.losses_bytes = losses.element_bytes();
    EXPECT_TRUE(losses.padding_intact()) << "losses: bytes outside the elements were written";
  }
  return r;
}

// Runs fast and reference and compares loss, gradient and per-row losses.
// `extra_grad_atol`: an absolute gradient tolerance on top of the relative one, for
// gradients that are differences of larger terms (q A - w t' is 0 for C = 1, say): the
// tests pass the rounding unit times the size of those terms.
inline void expect_matches_reference(const loss_call& fast, const loss_call& ref, const tensor& input,
                                     const output_request& req, double extra_grad_atol = 0) {
  const call_result f = run_call(fast, input, req);
  const call_result r = run_call(ref, input, req);
  EXPECT_TRUE(loss_near(f.loss, r.loss, loss_tolerance(input.type()))) << "loss";
  if (req.grad) {
    const dtype grad_type = req.in_place ? input.type() : req.grad_type;
    tolerance tol = array_tolerance(input.type(), grad_type);
    tol.atol += extra_grad_atol;
    EXPECT_TRUE(values_near(f.grad, r.grad, tol, "grad"));
  }
  if (req.losses) {
    tolerance tol = array_tolerance(input.type(), req.losses_type);
    tol.atol += loss_tolerance(input.type()).atol;  // a row loss of 0 may come out as a few roundings
    EXPECT_TRUE(values_near(f.losses, r.losses, tol, "losses"));
  }
}

// A random output request for logits of `input_shape` and per-row (or per-element) losses
// of `losses_shape` (only with reduction none).
inline output_request random_outputs(std::mt19937_64& rng, const tensor& input, bool reduction_none,
                                     const shape_t& losses_shape) {
  output_request req;
  req.grad = rng() % 8 != 0;
  const dtype floats[] = {dtype::float32, dtype::float64, dtype::bfloat16, dtype::float16};
  if (req.grad) {
    const auto pick = rng() % 6;
    if (pick == 0) {
      req.in_place = true;
    } else {
      // Mostly the input's dtype, sometimes another float dtype (the comparison then
      // allows one rounding of that dtype per element).
      req.grad_type = pick <= 3 ? input.type() : floats[rng() % 4];
      req.grad_layout = random_layout(rng, input.ndim());
    }
  }
  if (reduction_none && rng() % 4 != 0) {
    req.losses = true;
    req.losses_shape = losses_shape;
    req.losses_type = rng() % 2 ? dtype::float64 : floats[rng() % 4];
    req.losses_layout = random_layout(rng, static_cast<int>(losses_shape.size()));
  }
  return req;
}

// ---------------------------------------------------------------------------------------
// finite differences (float64)

// Central difference of `loss_at` (the loss as a function of the logits' flat values) at
// coordinate i, step h.
inline double central_difference(const std::function<double(const std::vector<double>&)>& loss_at,
                                 std::vector<double> x, std::size_t i, double h = 1e-5) {
  const double x0 = x[i];
  x[i] = x0 + h;
  const double up = loss_at(x);
  x[i] = x0 - h;
  const double down = loss_at(x);
  return (up - down) / (2 * h);
}

inline const char* reduction_text(softce::reduction r) {
  switch (r) {
    case softce::reduction::none: return "none";
    case softce::reduction::mean: return "mean";
    case softce::reduction::sum: return "sum";
    case softce::reduction::batchmean: return "batchmean";
  }
  return "?";
}

inline const char* divergence_text(softce::divergence d) {
  switch (d) {
    case softce::divergence::kl: return "kl";
    case softce::divergence::reverse_kl: return "reverse_kl";
    case softce::divergence::jsd: return "jsd";
  }
  return "?";
}

// Checks the float64 gradient of `fast` and `ref` (both (x values, outputs) -> loss) at a few
// random coordinates of the logits against central differences of each loss.
inline void expect_gradient_matches_finite_differences(
    const std::function<double(const tensor&, const softce::outputs&)>& fast,
    const std::function<double(const tensor&, const softce::outputs&)>& ref, const shape_t& shape,
    const std::vector<double>& x0, std::mt19937_64& rng, int coordinates = 6) {
  auto evaluate = [&](const std::function<double(const tensor&, const softce::outputs&)>& f,
                      const std::vector<double>& x) {
    return f(make_tensor(shape, dtype::float64, x), softce::outputs{});
  };
  auto gradient = [&](const std::function<double(const tensor&, const softce::outputs&)>& f) {
    tensor in = make_tensor(shape, dtype::float64, x0);
    tensor g(shape, dtype::float64);
    softce::outputs out;
    out.grad = g.mutable_view();
    f(in, out);
    return g.values();
  };
  const std::vector<double> grad_fast = gradient(fast);
  const std::vector<double> grad_ref = gradient(ref);
  double scale = 1e-3;
  for (double g : grad_ref)
    if (std::isfinite(g)) scale = std::max(scale, std::fabs(g));
  const double tol = 1e-6 * scale;
  if (x0.empty()) return;
  for (int k = 0; k < coordinates; ++k) {
    const std::size_t i = rng() % x0.size();
    if (!std::isfinite(x0[i])) continue;
    const double h = 1e-5 * std::max(1.0, std::fabs(x0[i]));
    const double fd_fast = central_difference([&](const std::vector<double>& x) { return evaluate(fast, x); }, x0, i, h);
    const double fd_ref = central_difference([&](const std::vector<double>& x) { return evaluate(ref, x); }, x0, i, h);
    EXPECT_NEAR(grad_ref[i], fd_ref, tol) << "reference gradient vs its own finite difference at " << i;
    EXPECT_NEAR(grad_fast[i], fd_fast, tol) << "fast gradient vs its own finite difference at " << i;
    EXPECT_NEAR(grad_fast[i], fd_ref, tol) << "fast gradient vs reference finite difference at " << i;
  }
}

// ---------------------------------------------------------------------------------------
// class-parallel: two shards in one process (two threads), exchanging through memory

struct two_shards {
  std::barrier<> sync{2};
  std::vector<double> parts[2];
  softce::class_shard shard(int which, std::int64_t offset, std::int64_t classes) {
    softce::class_shard s;
    s.class_offset = offset;
    s.num_classes = classes;
    s.all_reduce = [this, which](double* stats, std::int64_t count, int width, softce::row_stats_merge_fn merge) {
      const std::size_t n = static_cast<std::size_t>(count * width);
      parts[which].assign(stats, stats + n);
      sync.arrive_and_wait();
      std::vector<double> merged = parts[0];
      merge(merged.data(), parts[1].data(), count);
      std::memcpy(stats, merged.data(), n * sizeof(double));
      sync.arrive_and_wait();  // both have read the parts before the next call overwrites them
    };
    return s;
  }
};

// Column slice [begin, end) of a row-major (N, C) matrix.
inline std::vector<double> columns(const std::vector<double>& m, std::int64_t C, std::int64_t begin, std::int64_t end) {
  std::vector<double> out;
  for (std::size_t r = 0; r < m.size() / static_cast<std::size_t>(C); ++r)
    for (std::int64_t c = begin; c < end; ++c) out.push_back(m[r * static_cast<std::size_t>(C) + static_cast<std::size_t>(c)]);
  return out;
}

}  // namespace softce_test
