// softce reference implementation (see reference.hpp): docs/semantics.md transcribed into
// scalar float64 code. Clarity over speed: each row is read into a std::vector<double>, its
// softmax computed directly (no chunking, no online max), sums compensated (Neumaier) so the
// oracle is more accurate than anything it checks.
#include "reference.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace softce::reference {
namespace {

constexpr double infinity = std::numeric_limits<double>::infinity();
constexpr double not_a_number = std::numeric_limits<double>::quiet_NaN();

// ---------------------------------------------------------------------------------------
// element access (offsets in elements, may be negative)

std::int64_t element_size(dtype type) {
  switch (type) {
    case dtype::float32: return 4;
    case dtype::float64: return 8;
    case dtype::bfloat16: return 2;
    case dtype::float16: return 2;
    case dtype::int32: return 4;
    case dtype::int64: return 8;
    case dtype::boolean: return 1;
  }
  return 1;
}

template <class T>
T read_raw(const void* data, dtype type, std::int64_t offset) {
  T value;
  std::memcpy(&value, static_cast<const char*>(data) + offset * element_size(type), sizeof(T));
  return value;
}

template <class T>
void write_raw(void* data, dtype type, std::int64_t offset, T value) {
  std::memcpy(static_cast<char*>(data) + offset * element_size(type), &value, sizeof(T));
}

double load_at(const void* data, dtype type, std::int64_t offset) {
  switch (type) {
    case dtype::float32: return read_raw<float>(data, type, offset);
    case dtype::float64: return read_raw<double>(data, type, offset);
    case dtype::bfloat16: return from_bfloat16_bits(read_raw<std::uint16_t>(data, type, offset));
    case dtype::float16: return from_float16_bits(read_raw<std::uint16_t>(data, type, offset));
    case dtype::int32: return read_raw<std::int32_t>(data, type, offset);
    case dtype::int64: return static_cast<double>(read_raw<std::int64_t>(data, type, offset));
    case dtype::boolean: return read_raw<unsigned char>(data, type, offset) != 0 ? 1.0 : 0.0;
  }
  return not_a_number;
}

std::int64_t load_integer_at(const void* data, dtype type, std::int64_t offset) {
  switch (type) {
    case dtype::int32: return read_raw<std::int32_t>(data, type, offset);
    case dtype::int64: return read_raw<std::int64_t>(data, type, offset);
    case dtype::boolean: return read_raw<unsigned char>(data, type, offset) != 0 ? 1 : 0;
    default: return static_cast<std::int64_t>(load_at(data, type, offset));
  }
}

void store_at(void* data, dtype type, std::int64_t offset, double value) {
  switch (type) {
    // A double -> float conversion rounds to nearest-even (IEEE default rounding mode).
    case dtype::float32: write_raw<float>(data, type, offset, static_cast<float>(value)); break;
    case dtype::float64: write_raw<double>(data, type, offset, value); break;
    case dtype::bfloat16: write_raw<std::uint16_t>(data, type, offset, bfloat16_bits(value)); break;
    case dtype::float16: write_raw<std::uint16_t>(data, type, offset, float16_bits(value)); break;
    case dtype::int32:
      write_raw<std::int32_t>(data, type, offset, static_cast<std::int32_t>(value));
      break;
    case dtype::int64:
      write_raw<std::int64_t>(data, type, offset, static_cast<std::int64_t>(value));
      break;
    case dtype::boolean:
      write_raw<unsigned char>(data, type, offset, value != 0 ? 1 : 0);
      break;
  }
}

template <class Pointer>
std::int64_t offset_of(const basic_view<Pointer>& view, const std::int64_t* index) {
  std::int64_t offset = 0;
  for (int d = 0; d < view.ndim; ++d) offset += index[d] * view.strides[d];
  return offset;
}

// A 16-bit float with `mantissa_bits` stored fraction bits and `exponent_bits` exponent
// bits, rounded from double to nearest-even (overflow to inf, gradual underflow).
std::uint16_t round_to_16_bit(double value, int mantissa_bits, int exponent_bits) {
  const int bias = (1 << (exponent_bits - 1)) - 1;
  const int min_exponent = 1 - bias;
  const int max_exponent = bias;
  const std::uint16_t sign = std::signbit(value) ? 0x8000 : 0;
  const std::uint16_t exponent_all_ones =
      static_cast<std::uint16_t>(((1 << exponent_bits) - 1) << mantissa_bits);
  if (std::isnan(value))
    return sign | exponent_all_ones | static_cast<std::uint16_t>(1 << (mantissa_bits - 1));
  const double magnitude = std::fabs(value);
  if (std::isinf(magnitude)) return sign | exponent_all_ones;
  if (magnitude == 0) return sign;
  int e;
  std::frexp(magnitude, &e);  // magnitude in [2^(e-1), 2^e)
  // The spacing of representable values around `magnitude` is 2^quantum.
  const int quantum = std::max(e - 1, min_exponent) - mantissa_bits;
  const double significand = std::nearbyint(std::ldexp(magnitude, -quantum));  // exact scale
  const double rounded = std::ldexp(significand, quantum);
  if (rounded >= std::ldexp(1.0, max_exponent + 1)) return sign | exponent_all_ones;
  if (rounded < std::ldexp(1.0, min_exponent))  // subnormal: exponent field 0
    return sign | static_cast<std::uint16_t>(significand);
  std::frexp(rounded, &e);
  const int exponent = e - 1;
  const auto fraction = static_cast<std::uint16_t>(
      std::ldexp(rounded, mantissa_bits - exponent) - std::ldexp(1.0, mantissa_bits));
  return sign | static_cast<std::uint16_t>((exponent + bias) << mantissa_bits) | fraction;
}

double from_16_bit(std::uint16_t bits, int mantissa_bits, int exponent_bits) {
  const int bias = (1 << (exponent_bits - 1)) - 1;
  const int exponent_field = (bits >> mantissa_bits) & ((1 << exponent_bits) - 1);
  const int fraction = bits & ((1 << mantissa_bits) - 1);
  double magnitude;
  if (exponent_field == (1 << exponent_bits) - 1)
    magnitude = fraction != 0 ? not_a_number : infinity;
  else if (exponent_field == 0)
    magnitude = std::ldexp(static_cast<double>(fraction), 1 - bias - mantissa_bits);
  else
    magnitude = std::ldexp(static_cast<double>(fraction + (1 << mantissa_bits)),
                           exponent_field - bias - mantissa_bits);
  return (bits & 0x8000) ? -magnitude : magnitude;
}

// ---------------------------------------------------------------------------------------
// compensated summation (Neumaier); infinities and NaN propagate as in a plain sum

class accurate_sum {
 public:
  void add(double value) {
    plain_ += value;
    const double t = sum_ + value;
    if (std::fabs(sum_) >= std::fabs(value))
      compensation_ += (sum_ - t) + value;
    else
      compensation_ += (value - t) + sum_;
    sum_ = t;
  }
  double value() const { return std::isfinite(plain_) ? sum_ + compensation_ : plain_; }

 private:
  double sum_ = 0, compensation_ = 0, plain_ = 0;
};

// ---------------------------------------------------------------------------------------
// rows: input (C,) is one row; (N, C, d1..dk) has rows (n, d1..dk) and classes on dim 1

struct row_geometry {
  std::int64_t rows = 1;
  std::int64_t classes = 1;
  int row_ndim = 0;
  std::int64_t row_shape[max_dims] = {};

  // The multi-index of row r in the row shape (row-major).
  void unravel(std::int64_t r, std::int64_t* index) const {
    for (int d = row_ndim - 1; d >= 0; --d) {
      index[d] = r % row_shape[d];
      r /= row_shape[d];
    }
  }
};

row_geometry geometry_of(const array_view& input) {
  row_geometry g;
  if (input.ndim == 1) {
    g.classes = input.shape[0];
    return g;
  }
  g.classes = input.shape[1];
  g.row_ndim = input.ndim - 1;
  g.row_shape[0] = input.shape[0];
  for (int d = 2; d < input.ndim; ++d) g.row_shape[d - 1] = input.shape[d];
  for (int d = 0; d < g.row_ndim; ++d) g.rows *= g.row_shape[d];
  return g;
}

// Element (row, class) of a view with the input's shape.
struct class_addressing {
  std::int64_t row_strides[max_dims] = {};
  std::int64_t class_stride = 0;

  template <class Pointer>
  explicit class_addressing(const basic_view<Pointer>& v) {
    if (v.ndim == 1) {
      class_stride = v.strides[0];
      return;
    }
    class_stride = v.strides[1];
    row_strides[0] = v.strides[0];
    for (int d = 2; d < v.ndim; ++d) row_strides[d - 1] = v.strides[d];
  }
  std::int64_t row_offset(const row_geometry& g, std::int64_t r) const {
    std::int64_t index[max_dims];
    g.unravel(r, index);
    std::int64_t offset = 0;
    for (int d = 0; d < g.row_ndim; ++d) offset += index[d] * row_strides[d];
    return offset;
  }
};

// Element (row) or (row, k) of a view with the row shape, or the row shape plus one
// trailing dimension (top-k indices and values).
struct row_addressing {
  std::int64_t row_strides[max_dims] = {};
  std::int64_t last_stride = 0;

  template <class Pointer>
  row_addressing(const basic_view<Pointer>& v, const row_geometry& g) {
    for (int d = 0; d < g.row_ndim; ++d) row_strides[d] = v.strides[d];
    if (v.ndim > g.row_ndim) last_stride = v.strides[g.row_ndim];
  }
  std::int64_t row_offset(const row_geometry& g, std::int64_t r) const {
    std::int64_t index[max_dims];
    g.unravel(r, index);
    std::int64_t offset = 0;
    for (int d = 0; d < g.row_ndim; ++d) offset += index[d] * row_strides[d];
    return offset;
  }
};

std::vector<double> read_row(const array_view& v, const class_addressing& a,
                             const row_geometry& g, std::int64_t r) {
  std::vector<double> values(static_cast<std::size_t>(g.classes));
  const std::int64_t base = a.row_offset(g, r);
  for (std::int64_t c = 0; c < g.classes; ++c)
    values[c] = load_at(v.data, v.type, base + c * a.class_stride);
  return values;
}

void write_row(const mutable_array_view& v, const class_addressing& a, const row_geometry& g,
               std::int64_t r, const std::vector<double>& values) {
  const std::int64_t base = a.row_offset(g, r);
  for (std::int64_t c = 0; c < g.classes; ++c)
    store_at(v.data, v.type, base + c * a.class_stride, values[c]);
}

void write_zero_row(const mutable_array_view& v, const class_addressing& a,
                    const row_geometry& g, std::int64_t r) {
  const std::int64_t base = a.row_offset(g, r);
  for (std::int64_t c = 0; c < g.classes; ++c) store_at(v.data, v.type, base + c * a.class_stride, 0.0);
}

// Per-row mask (true when absent).
std::vector<bool> read_mask(const std::optional<array_view>& mask, const row_geometry& g) {
  std::vector<bool> keep(static_cast<std::size_t>(g.rows), true);
  if (!mask) return keep;
  const row_addressing a(*mask, g);
  for (std::int64_t r = 0; r < g.rows; ++r)
    keep[r] = load_at(mask->data, mask->type, a.row_offset(g, r)) != 0;
  return keep;
}

std::vector<double> read_class_weights(const std::optional<array_view>& weight,
                                       std::int64_t classes) {
  std::vector<double> w(static_cast<std::size_t>(classes), 1.0);
  if (!weight) return w;
  for (std::int64_t c = 0; c < classes; ++c)
    w[c] = load_at(weight->data, weight->type, c * weight->strides[0]);
  return w;
}

double log_sum_exp(const std::vector<double>& x) {
  double max = -infinity;
  for (double v : x) max = std::max(max, v);
  if (max == -infinity) return -infinity;
  accurate_sum s;
  for (double v : x) s.add(std::exp(v - max));
  return max + std::log(s.value());
}

// ---------------------------------------------------------------------------------------
// cross-entropy of one row against a dense weighted target (semantics.md):
//   weighted_target[c] = w_c t'_c,  A = sum_c w_c t'_c
//   loss   = sum_c w_c t'_c (lse - x_c)     (0 for a term with w_c t'_c = 0)
//   grad_c = coef (q_c A - w_c t'_c)
// plus, for a top-k target with tail mass tau = 1 - sum_k v_k outside the top-k set K,
// the bucket term -tau log(1 - Q), Q = sum_{c in K} q_c, whose gradient is
//   tau q_c for c in K,  -tau q_c Q / (1 - Q) for c outside K
// (the target outside K is then tau q_c / (1 - Q): the tail spread like the prediction).

struct tail_term {
  double tau = 0;
  const std::vector<bool>* in_topk = nullptr;  // null: no tail
};

// NaN rule (semantics.md): a NaN or +inf logit poisons the row (torch: lse = +inf, so every
// q is NaN), and so does a weighted target that is not finite (NaN, or an infinite target or
// weight, where torch mixes inf and NaN): loss NaN and every gradient entry NaN.
bool any_nan_or_positive_inf(const std::vector<double>& values) {
  for (double v : values)
    if (std::isnan(v) || v == infinity) return true;
  return false;
}

bool all_finite(const std::vector<double>& values) {
  for (double v : values)
    if (!std::isfinite(v)) return false;
  return true;
}

double poisoned_row(std::vector<double>* grad) {
  if (grad) std::fill(grad->begin(), grad->end(), not_a_number);
  return not_a_number;
}

double cross_entropy_row(const std::vector<double>& x, const std::vector<double>& weighted_target,
                         const tail_term& tail, double coef, std::vector<double>* grad) {
  if (any_nan_or_positive_inf(x) || !all_finite(weighted_target)) return poisoned_row(grad);
  const std::size_t C = x.size();
  accurate_sum A_sum;
  for (double wt : weighted_target) A_sum.add(wt);
  const double A = A_sum.value();
  const double lse = log_sum_exp(x);
  const bool tail_active = tail.in_topk != nullptr && tail.tau != 0;

  if (lse == -infinity) {
    // All logits -inf: q = 0, loss +inf if A > 0 else 0, gradient -coef w_c t'_c.
    if (grad)
      for (std::size_t c = 0; c < C; ++c) (*grad)[c] = coef * (0.0 * A - weighted_target[c]);
    return A > 0 ? infinity : 0.0;
  }

  std::vector<double> q(C);
  for (std::size_t c = 0; c < C; ++c) q[c] = std::exp(x[c] - lse);

  accurate_sum loss;
  for (std::size_t c = 0; c < C; ++c)
    if (weighted_target[c] != 0) loss.add(weighted_target[c] * (lse - x[c]));

  // Q = sum_K q from a separate sum of exp(x - M) (no cancellation), and log(1 - Q) as the
  // log-sum-exp of the tail against the tail's own max minus lse: exact however far the tail
  // lies below the max (exp(x - M) of every tail class may underflow even in double).
  double Q = 0, tail_lse = -infinity;
  if (tail_active) {
    double max = -infinity, tail_max = -infinity;
    for (std::size_t c = 0; c < C; ++c) {
      max = std::max(max, x[c]);
      if (!(*tail.in_topk)[c]) tail_max = std::max(tail_max, x[c]);
    }
    accurate_sum all, inside_sum, outside_sum;
    for (std::size_t c = 0; c < C; ++c) {
      all.add(std::exp(x[c] - max));
      if ((*tail.in_topk)[c])
        inside_sum.add(std::exp(x[c] - max));
      else if (tail_max != -infinity)
        outside_sum.add(std::exp(x[c] - tail_max));
    }
    Q = inside_sum.value() / all.value();
    if (tail_max != -infinity) tail_lse = tail_max + std::log(outside_sum.value());
    loss.add(-tail.tau * (tail_lse - lse));  // with K empty: lse - lse = 0
  }

  if (grad) {
    for (std::size_t c = 0; c < C; ++c) {
      double g = q[c] * A - weighted_target[c];
      if (tail_active) {
        if ((*tail.in_topk)[c])
          g += tail.tau * q[c];
        else if (tail_lse != -infinity)  // q_c / (1 - Q) = exp(x_c - tail_lse)
          g -= tail.tau * Q * std::exp(x[c] - tail_lse);
      }
      (*grad)[c] = coef * g;
    }
  }
  return loss.value();
}

enum class target_kind { probabilities, indices, topk };

// One implementation behind the three cross_entropy forms.
struct ce_target {
  target_kind kind;
  array_view dense;   // probabilities or indices
  topk sparse;        // top-k
};

double cross_entropy_impl(const array_view& input, const ce_target& target,
                          const cross_entropy_options& options, const outputs& out) {
  const row_geometry g = geometry_of(input);
  const std::int64_t C = g.classes;
  const std::vector<double> w = read_class_weights(options.weight, C);
  const double eps = options.label_smoothing;
  const class_addressing input_at(input);

  // Which rows count, and the mean denominator.
  std::vector<bool> keep(static_cast<std::size_t>(g.rows), true);
  std::vector<std::int64_t> labels;
  accurate_sum denominator;
  std::int64_t kept_rows = 0;
  if (target.kind == target_kind::indices) {
    labels.resize(static_cast<std::size_t>(g.rows));
    const row_addressing a(target.dense, g);
    for (std::int64_t r = 0; r < g.rows; ++r) {
      labels[r] = load_integer_at(target.dense.data, target.dense.type, a.row_offset(g, r));
      keep[r] = labels[r] != options.ignore_index;
      if (keep[r]) {
        denominator.add(w[labels[r]]);
        ++kept_rows;
      }
    }
  } else {
    keep = read_mask(options.mask, g);
    for (std::int64_t r = 0; r < g.rows; ++r)
      if (keep[r]) {
        denominator.add(1.0);
        ++kept_rows;
      }
  }

  const bool mean = options.reduce == reduction::mean;
  // mean over nothing (no rows, or a zero total weight): NaN, zero gradient
  const bool no_rows = mean && (kept_rows == 0 || denominator.value() == 0);
  const double coef = mean ? (no_rows ? 0.0 : 1.0 / denominator.value()) : 1.0;

  std::optional<class_addressing> grad_at, grad_target_at;
  if (out.grad) grad_at.emplace(*out.grad);
  // d loss / d t_c (probability targets): coef (1 - eps) w_c (lse - x_c), 0 where a zero
  // weighted target meets lse - x_c = +inf; NaN where lse has none (NaN or +inf logit)
  const bool target_gradient = out.grad_target && target.kind == target_kind::probabilities;
  if (target_gradient) grad_target_at.emplace(*out.grad_target);
  std::optional<row_addressing> losses_at;
  const bool write_losses = out.losses && options.reduce == reduction::none;
  if (write_losses) losses_at.emplace(*out.losses, g);

  accurate_sum total;
  std::vector<double> weighted_target(static_cast<std::size_t>(C));
  std::vector<bool> in_topk;
  std::vector<double> grad_row;
  for (std::int64_t r = 0; r < g.rows; ++r) {
    double row_loss = 0;
    if (!keep[r] || no_rows) {
      if (out.grad) write_zero_row(*out.grad, *grad_at, g, r);
      if (target_gradient) write_zero_row(*out.grad_target, *grad_target_at, g, r);
    } else {
      const std::vector<double> x = read_row(input, input_at, g, r);
      tail_term tail;
      // t'_c = (1 - eps) t_c + eps / C, times w_c
      switch (target.kind) {
        case target_kind::probabilities: {
          const class_addressing t_at(target.dense);
          const std::int64_t base = t_at.row_offset(g, r);
          for (std::int64_t c = 0; c < C; ++c) {
            const double t = load_at(target.dense.data, target.dense.type, base + c * t_at.class_stride);
            weighted_target[c] = w[c] * ((1 - eps) * t + eps / static_cast<double>(C));
          }
          break;
        }
        case target_kind::indices:
          // without smoothing only the row's own class weight is used (torch's nll_loss):
          // a NaN weight of another class must not reach the row as w_c * 0
          for (std::int64_t c = 0; c < C; ++c)
            weighted_target[c] =
                eps == 0 ? (c == labels[r] ? w[c] : 0.0)
                         : w[c] * ((1 - eps) * (c == labels[r] ? 1.0 : 0.0) + eps / static_cast<double>(C));
          break;
        case target_kind::topk: {
          std::vector<double> t(static_cast<std::size_t>(C), 0.0);
          in_topk.assign(static_cast<std::size_t>(C), false);
          const topk& k = target.sparse;
          const row_addressing i_at(k.indices, g), v_at(k.values, g);
          const std::int64_t K = k.indices.ndim > g.row_ndim ? k.indices.shape[g.row_ndim] : 0;
          const std::int64_t i_base = i_at.row_offset(g, r), v_base = v_at.row_offset(g, r);
          accurate_sum mass;
          for (std::int64_t j = 0; j < K; ++j) {
            const std::int64_t c =
                load_integer_at(k.indices.data, k.indices.type, i_base + j * i_at.last_stride);
            const double v = load_at(k.values.data, k.values.type, v_base + j * v_at.last_stride);
            t[c] = v;
            in_topk[c] = true;
            mass.add(v);
          }
          for (std::int64_t c = 0; c < C; ++c)
            weighted_target[c] = w[c] * ((1 - eps) * t[c] + eps / static_cast<double>(C));
          if (k.tail && K < C) {  // a top-k covering every class has no tail
            tail.tau = 1 - mass.value();
            tail.in_topk = &in_topk;
          }
          break;
        }
      }
      if (target_gradient) {
        const double lse = any_nan_or_positive_inf(x) ? not_a_number : log_sum_exp(x);
        std::vector<double> row(static_cast<std::size_t>(C));
        for (std::int64_t c = 0; c < C; ++c) {
          double d = lse - x[c];
          if (weighted_target[c] == 0 && d == infinity) d = 0;
          // a non-finite class weight: no value (inf times a -log q that may round to 0)
          row[c] = std::isfinite(w[c]) ? coef * (1 - eps) * w[c] * d : not_a_number;
        }
        write_row(*out.grad_target, *grad_target_at, g, r, row);
      }
      if (out.grad) grad_row.assign(static_cast<std::size_t>(C), 0.0);
      row_loss = cross_entropy_row(x, weighted_target, tail, coef, out.grad ? &grad_row : nullptr);
      if (out.grad) write_row(*out.grad, *grad_at, g, r, grad_row);
    }
    total.add(row_loss);
    if (write_losses)
      store_at(out.losses->data, out.losses->type, losses_at->row_offset(g, r), row_loss);
  }
  if (no_rows) return not_a_number;
  return mean ? total.value() / denominator.value() : total.value();
}

// ---------------------------------------------------------------------------------------
// element-wise losses: every element of the input's shape, row-major

struct element_walker {
  int ndim;
  const std::int64_t* shape;
  std::int64_t index[max_dims] = {};

  void unravel(std::int64_t i) {
    for (int d = ndim - 1; d >= 0; --d) {
      index[d] = i % shape[d];
      i /= shape[d];
    }
  }
  // Offset in a view broadcast (NumPy rules, right-aligned) to the walked shape.
  std::int64_t broadcast_offset(const array_view& v) const {
    std::int64_t offset = 0;
    for (int d = 0; d < v.ndim; ++d) {
      const int walked = d + (ndim - v.ndim);
      if (v.shape[d] != 1) offset += index[walked] * v.strides[d];
    }
    return offset;
  }
};

double reduce_elementwise(const accurate_sum& total, reduction reduce, double denominator) {
  if (reduce == reduction::mean || reduce == reduction::batchmean)
    return total.value() / denominator;
  return total.value();
}

// ---------------------------------------------------------------------------------------
// distillation: one row of student logits x and teacher (logits z or top-k probabilities)

double log_add_exp(double a, double b) {
  if (a == -infinity) return b;
  if (b == -infinity) return a;
  const double m = std::max(a, b);
  return m + std::log1p(std::exp(-std::fabs(a - b)));
}

// Student side: u = x / T, log q = u - lse(u), q.
struct student_row {
  std::vector<double> log_q, q;
};

student_row student_of(const std::vector<double>& x, double T) {
  std::vector<double> u(x.size());
  for (std::size_t c = 0; c < x.size(); ++c) u[c] = x[c] / T;
  const double lse = log_sum_exp(u);
  student_row s;
  s.log_q.resize(x.size());
  s.q.resize(x.size());
  for (std::size_t c = 0; c < x.size(); ++c) {
    s.log_q[c] = u[c] - lse;
    s.q[c] = std::exp(s.log_q[c]);
  }
  return s;
}

// Row loss T^2 D and gradient coef * T * dD/du for teacher logits z.
// With `grad_teacher`, also d loss / d z (coef T times):
//   kl: p (log p - log q - KL(p||q));  reverse_kl: p - q;
//   jsd: beta p (log p - log m - KL(p||m));  a term with p = 0 being 0.
double distillation_row(const std::vector<double>& x, const std::vector<double>& z,
                        const distillation_options& o, double coef, std::vector<double>* grad,
                        std::vector<double>* grad_teacher) {
  if (any_nan_or_positive_inf(x) || any_nan_or_positive_inf(z)) {
    poisoned_row(grad_teacher);
    return poisoned_row(grad);
  }
  // a side with every logit -inf has no softmax (torch's log_softmax is NaN there)
  auto all_minus_inf = [](const std::vector<double>& v) {
    return !v.empty() && std::all_of(v.begin(), v.end(), [](double e) { return e == -infinity; });
  };
  if (all_minus_inf(x) || all_minus_inf(z)) {
    poisoned_row(grad_teacher);
    return poisoned_row(grad);
  }
  const double T = o.temperature;
  const std::size_t C = x.size();
  const student_row s = student_of(x, T);
  const student_row p_side = student_of(z, T);  // the same transform gives log p, p
  const std::vector<double>& log_q = s.log_q;
  const std::vector<double>& q = s.q;
  const std::vector<double>& log_p = p_side.log_q;
  const std::vector<double>& p = p_side.q;

  divergence kind = o.kind;
  if (kind == divergence::jsd && o.beta == 0) kind = divergence::kl;          // TRL endpoints
  if (kind == divergence::jsd && o.beta == 1) kind = divergence::reverse_kl;

  accurate_sum D;
  switch (kind) {
    case divergence::kl:
      // q = 0 where p > 0 (x = -inf, z finite): +inf, whether or not p underflows
      for (std::size_t c = 0; c < C; ++c)
        if (x[c] == -infinity && z[c] != -infinity) D.add(infinity);
      for (std::size_t c = 0; c < C; ++c)
        if (p[c] != 0) D.add(p[c] * (log_p[c] - log_q[c]));
      if (grad)
        for (std::size_t c = 0; c < C; ++c) (*grad)[c] = coef * T * (q[c] - p[c]);
      if (grad_teacher) {
        const double kl = D.value();
        for (std::size_t c = 0; c < C; ++c)
          (*grad_teacher)[c] = p[c] == 0 ? 0.0 : coef * T * (p[c] * (log_p[c] - log_q[c] - kl));
      }
      break;
    case divergence::reverse_kl: {
      // p = 0 where q > 0 (x finite, z = -inf): KL(q || p) = +inf and no gradient (NaN),
      // whether or not q underflows
      for (std::size_t c = 0; c < C; ++c)
        if (x[c] != -infinity && z[c] == -infinity) {
          if (grad) std::fill(grad->begin(), grad->end(), not_a_number);
          if (grad_teacher) std::fill(grad_teacher->begin(), grad_teacher->end(), not_a_number);
          return infinity;
        }
      for (std::size_t c = 0; c < C; ++c)
        if (q[c] != 0) D.add(q[c] * (log_q[c] - log_p[c]));
      const double R = D.value();
      if (grad)
        for (std::size_t c = 0; c < C; ++c)
          (*grad)[c] = q[c] == 0 ? 0.0 : coef * T * q[c] * (log_q[c] - log_p[c] - R);
      if (grad_teacher)
        for (std::size_t c = 0; c < C; ++c) (*grad_teacher)[c] = coef * T * (p[c] - q[c]);
      break;
    }
    case divergence::jsd: {
      const double beta = o.beta;
      std::vector<double> log_m(C);  // log(beta p + (1 - beta) q), without underflow
      for (std::size_t c = 0; c < C; ++c)
        log_m[c] = log_add_exp(std::log(beta) + log_p[c], std::log1p(-beta) + log_q[c]);
      accurate_sum kl_pm, kl_qm;
      for (std::size_t c = 0; c < C; ++c) {
        if (p[c] != 0) kl_pm.add(p[c] * (log_p[c] - log_m[c]));
        if (q[c] != 0) kl_qm.add(q[c] * (log_q[c] - log_m[c]));
      }
      D.add(beta * kl_pm.value());
      D.add((1 - beta) * kl_qm.value());
      const double kl_q = kl_qm.value();
      if (grad)
        for (std::size_t c = 0; c < C; ++c)
          (*grad)[c] =
              q[c] == 0 ? 0.0 : coef * T * (1 - beta) * q[c] * (log_q[c] - log_m[c] - kl_q);
      if (grad_teacher) {
        const double kl_p = kl_pm.value();
        for (std::size_t c = 0; c < C; ++c)
          (*grad_teacher)[c] = p[c] == 0 ? 0.0 : coef * T * beta * (p[c] * (log_p[c] - log_m[c] - kl_p));
      }
      break;
    }
  }
  return T * T * D.value();
}

// Top-k teacher (kl): loss T^2 (sum_k v log v - sum_k v log q_k) plus, with tail,
// T^2 (tau log tau - tau log(1 - Q)); gradient T times the top-k cross-entropy gradient of u.
double distillation_topk_row(const std::vector<double>& x, const std::vector<std::int64_t>& idx,
                             const std::vector<double>& values, bool with_tail,
                             const distillation_options& o, double coef,
                             std::vector<double>* grad) {
  const double T = o.temperature;
  const std::size_t C = x.size();
  std::vector<double> u(C), t(C, 0.0);
  std::vector<bool> in_topk(C, false);
  for (std::size_t c = 0; c < C; ++c) u[c] = x[c] / T;
  accurate_sum mass, entropy_term;
  for (std::size_t j = 0; j < idx.size(); ++j) {
    t[idx[j]] = values[j];
    in_topk[idx[j]] = true;
    mass.add(values[j]);
    if (values[j] != 0) entropy_term.add(values[j] * std::log(values[j]));
  }
  tail_term tail;
  double tau = 0;
  if (with_tail && static_cast<std::int64_t>(idx.size()) < static_cast<std::int64_t>(u.size())) {
    tau = 1 - mass.value();
    tail.tau = tau;
    tail.in_topk = &in_topk;
  }
  // The cross-entropy row gives -sum_k v log q_k (and -tau log(1 - Q)) and its gradient.
  const double cross = cross_entropy_row(u, t, tail, coef * T, grad);
  double loss = entropy_term.value() + cross;
  if (tau > 0) loss += tau * std::log(tau);  // tau log tau taken as 0 for tau <= 0
  return T * T * loss;
}

double distillation_impl(const array_view& student, const array_view* teacher_logits,
                         const topk* teacher_topk, const distillation_options& o,
                         const outputs& out) {
  const row_geometry g = geometry_of(student);
  const std::int64_t C = g.classes;
  const std::vector<bool> keep = read_mask(o.mask, g);
  std::int64_t kept_rows = 0;
  for (std::int64_t r = 0; r < g.rows; ++r) kept_rows += keep[r] ? 1 : 0;

  double denominator = 1;
  if (o.reduce == reduction::batchmean) denominator = static_cast<double>(kept_rows);
  if (o.reduce == reduction::mean) denominator = static_cast<double>(kept_rows) * static_cast<double>(C);
  const bool averaged = o.reduce == reduction::batchmean || o.reduce == reduction::mean;
  const bool no_rows = averaged && kept_rows == 0;
  const double coef = averaged ? 1.0 / denominator : 1.0;

  const class_addressing student_at(student);
  std::optional<class_addressing> teacher_at, grad_at, grad_teacher_at;
  if (teacher_logits) teacher_at.emplace(*teacher_logits);
  if (out.grad) grad_at.emplace(*out.grad);
  const bool teacher_gradient = out.grad_target && teacher_logits;
  if (teacher_gradient) grad_teacher_at.emplace(*out.grad_target);
  std::optional<row_addressing> losses_at;
  const bool write_losses = out.losses && o.reduce == reduction::none;
  if (write_losses) losses_at.emplace(*out.losses, g);

  accurate_sum total;
  std::vector<double> grad_row, grad_teacher_row;
  for (std::int64_t r = 0; r < g.rows; ++r) {
    double row_loss = 0;
    if (!keep[r] || no_rows) {
      if (out.grad) write_zero_row(*out.grad, *grad_at, g, r);
      if (teacher_gradient) write_zero_row(*out.grad_target, *grad_teacher_at, g, r);
    } else {
      const std::vector<double> x = read_row(student, student_at, g, r);
      if (out.grad) grad_row.assign(static_cast<std::size_t>(C), 0.0);
      std::vector<double>* grad = out.grad ? &grad_row : nullptr;
      if (teacher_logits) {
        const std::vector<double> z = read_row(*teacher_logits, *teacher_at, g, r);
        grad_teacher_row.assign(static_cast<std::size_t>(C), 0.0);
        row_loss = distillation_row(x, z, o, coef, grad, teacher_gradient ? &grad_teacher_row : nullptr);
        if (teacher_gradient) write_row(*out.grad_target, *grad_teacher_at, g, r, grad_teacher_row);
      } else {
        const topk& k = *teacher_topk;
        const row_addressing i_at(k.indices, g), v_at(k.values, g);
        const std::int64_t K = k.indices.ndim > g.row_ndim ? k.indices.shape[g.row_ndim] : 0;
        std::vector<std::int64_t> idx(static_cast<std::size_t>(K));
        std::vector<double> values(static_cast<std::size_t>(K));
        const std::int64_t i_base = i_at.row_offset(g, r), v_base = v_at.row_offset(g, r);
        for (std::int64_t j = 0; j < K; ++j) {
          idx[j] = load_integer_at(k.indices.data, k.indices.type, i_base + j * i_at.last_stride);
          values[j] = load_at(k.values.data, k.values.type, v_base + j * v_at.last_stride);
        }
        row_loss = distillation_topk_row(x, idx, values, k.tail, o, coef, grad);
      }
      if (out.grad) write_row(*out.grad, *grad_at, g, r, grad_row);
    }
    total.add(row_loss);
    if (write_losses)
      store_at(out.losses->data, out.losses->type, losses_at->row_offset(g, r), row_loss);
  }
  if (no_rows) return not_a_number;
  return averaged ? total.value() / denominator : total.value();
}

}  // namespace

// ---------------------------------------------------------------------------------------
// public entry points

std::uint16_t float16_bits(double value) { return round_to_16_bit(value, 10, 5); }
std::uint16_t bfloat16_bits(double value) { return round_to_16_bit(value, 7, 8); }
double from_float16_bits(std::uint16_t bits) { return from_16_bit(bits, 10, 5); }
double from_bfloat16_bits(std::uint16_t bits) { return from_16_bit(bits, 7, 8); }

double load(const array_view& view, const std::int64_t* index) {
  return load_at(view.data, view.type, offset_of(view, index));
}
std::int64_t load_integer(const array_view& view, const std::int64_t* index) {
  return load_integer_at(view.data, view.type, offset_of(view, index));
}
void store(const mutable_array_view& view, const std::int64_t* index, double value) {
  store_at(view.data, view.type, offset_of(view, index), value);
}

double cross_entropy(const array_view& input, const array_view& target,
                     const cross_entropy_options& options, const outputs& out) {
  const bool indices = target.type == dtype::int32 || target.type == dtype::int64;
  ce_target t{indices ? target_kind::indices : target_kind::probabilities, target, {}};
  return cross_entropy_impl(input, t, options, out);
}

double cross_entropy(const array_view& input, const topk& target,
                     const cross_entropy_options& options, const outputs& out) {
  ce_target t{target_kind::topk, {}, target};
  return cross_entropy_impl(input, t, options, out);
}

double cross_entropy_with_probs(const array_view& input, const array_view& target,
                                std::optional<array_view> weight, reduction reduce,
                                const outputs& out) {
  cross_entropy_options options;
  options.weight = weight;
  options.reduce = reduce;
  ce_target t{target_kind::probabilities, target, {}};
  return cross_entropy_impl(input, t, options, out);
}

double kl_div(const array_view& input, const array_view& target, const kl_div_options& options,
              const outputs& out) {
  //   log_target = false: loss = 0 if t == 0 else t (log t - x),      grad = -t
  //   log_target = true:  loss = 0 if t == -inf else e^t (t - x),     grad = -e^t
  const std::int64_t numel = input.numel();
  double denominator = 1;
  if (options.reduce == reduction::mean) denominator = static_cast<double>(numel);
  if (options.reduce == reduction::batchmean && input.ndim > 0)
    denominator = static_cast<double>(input.shape[0]);
  const double coef = 1.0 / denominator;
  const bool write_losses = out.losses && options.reduce == reduction::none;

  element_walker walk{input.ndim, input.shape};
  accurate_sum total;
  for (std::int64_t i = 0; i < numel; ++i) {
    walk.unravel(i);
    const double x = load(input, walk.index);
    const double t = load(target, walk.index);
    double loss, grad, grad_target;  // d/dt as torch's own expression differentiates it
    if (options.log_target) {
      loss = t == -infinity ? 0.0 : std::exp(t) * (t - x);
      grad = -std::exp(t);
      grad_target = t == -infinity ? 0.0 : std::exp(t) * (t - x + 1);
    } else {
      loss = t == 0 ? 0.0 : t * (std::log(t) - x);
      grad = -t;
      grad_target = t == 0 ? not_a_number : std::log(t) + 1 - x;  // xlogy(t, t)' is 0/0 at 0
    }
    if (out.grad_target) store(*out.grad_target, walk.index, coef * grad_target);
    if (std::isnan(x)) loss = grad = not_a_number;  // the formulas above never look at x there
    total.add(loss);
    if (out.grad) store(*out.grad, walk.index, coef * grad);
    if (write_losses) store(*out.losses, walk.index, loss);
  }
  return reduce_elementwise(total, options.reduce, denominator);
}

double binary_cross_entropy_with_logits(const array_view& input, const array_view& target,
                                        const bce_options& options, const outputs& out) {
  //   a    = pos_weight t,  b = 1 - t
  //   loss = weight (a softplus(-x) + b softplus(x))    (a term with a zero coefficient is 0)
  //   grad = weight (b sigmoid(x) - a sigmoid(-x))
  const std::int64_t numel = input.numel();
  const double denominator =
      options.reduce == reduction::mean ? static_cast<double>(numel) : 1.0;
  const double coef = 1.0 / denominator;
  const bool write_losses = out.losses && options.reduce == reduction::none;

  element_walker walk{input.ndim, input.shape};
  accurate_sum total;
  for (std::int64_t i = 0; i < numel; ++i) {
    walk.unravel(i);
    const double x = load(input, walk.index);
    const double t = load(target, walk.index);
    const double w = options.weight
                         ? load_at(options.weight->data, options.weight->type,
                                   walk.broadcast_offset(*options.weight))
                         : 1.0;
    const double pos_weight = options.pos_weight
                                  ? load_at(options.pos_weight->data, options.pos_weight->type,
                                            walk.broadcast_offset(*options.pos_weight))
                                  : 1.0;
    const double a = pos_weight * t, b = 1 - t;
    const double log1p_e = std::log1p(std::exp(-std::fabs(x)));
    const double softplus_minus_x = log1p_e + std::max(-x, 0.0), softplus_x = log1p_e + std::max(x, 0.0);
    double loss = w * ((a == 0 ? 0.0 : a * softplus_minus_x) + (b == 0 ? 0.0 : b * softplus_x));
    if (std::isnan(x)) loss = x;  // pos_weight 0 at t = 1 zeroes both terms
    // sigmoid(x) and sigmoid(-x) without cancellation
    const double e = std::exp(-std::fabs(x));
    const double sigmoid_x = x >= 0 ? 1 / (1 + e) : e / (1 + e), sigmoid_minus_x = x >= 0 ? e / (1 + e) : 1 / (1 + e);
    const double grad = w * (b * sigmoid_x - a * sigmoid_minus_x);
    if (out.grad_target)  // d/dt = w (pos_weight softplus(-x) - softplus(x)), a masked term's 0
      store(*out.grad_target, walk.index,
            coef * w * ((a == 0 && std::isinf(softplus_minus_x) ? 0.0 : pos_weight * softplus_minus_x) -
                        (b == 0 && std::isinf(softplus_x) ? 0.0 : softplus_x)));
    total.add(loss);
    if (out.grad) store(*out.grad, walk.index, coef * grad);
    if (write_losses) store(*out.losses, walk.index, loss);
  }
  return reduce_elementwise(total, options.reduce, denominator);
}

// distillation_loss's `dim`: the class dimension moved to index 1, the row dimensions kept
// in their order, in every class-shaped array (student, teacher, grad, grad_target); the
// mask, per-row losses and top-k arrays are row-shaped already.
template <class View>
View class_dim_first(View v, std::optional<int> dim) {
  if (!dim || v.ndim < 3) return v;  // 1-d and 2-d: the last dimension, as without dim
  const int d = *dim < 0 ? *dim + v.ndim : *dim;
  View moved = v;
  int next = 0;
  for (int i = 0; i < v.ndim; ++i) {
    if (i == d) continue;
    const int to = next == 0 ? 0 : next + 1;  // index 1 is the class dimension's
    moved.shape[to] = v.shape[i];
    moved.strides[to] = v.strides[i];
    ++next;
  }
  moved.shape[1] = v.shape[d];
  moved.strides[1] = v.strides[d];
  return moved;
}

outputs class_dim_first(const outputs& out, std::optional<int> dim) {
  outputs moved = out;
  if (out.grad) moved.grad = class_dim_first(*out.grad, dim);
  if (out.grad_target) moved.grad_target = class_dim_first(*out.grad_target, dim);
  return moved;
}

double distillation_loss(const array_view& student_logits, const array_view& teacher_logits,
                         const distillation_options& options, const outputs& out) {
  const array_view teacher = class_dim_first(teacher_logits, options.dim);
  return distillation_impl(class_dim_first(student_logits, options.dim), &teacher, nullptr, options,
                           class_dim_first(out, options.dim));
}

double distillation_loss(const array_view& student_logits, const topk& teacher,
                         const distillation_options& options, const outputs& out) {
  return distillation_impl(class_dim_first(student_logits, options.dim), nullptr, &teacher, options,
                           class_dim_first(out, options.dim));
}

}  // namespace softce::reference
