// softce — fused soft-label classification losses (loss and gradient in one pass).
//
// This is the whole public C++ API. Arrays cross it as views of raw memory (pointer, dtype,
// shape, strides in elements); no framework types appear here. Every function validates its
// arguments once, throws softce::error with a short precise message on bad input, and
// otherwise never fails.
//
// Shapes follow torch.nn.functional.cross_entropy: logits are (C,), (N, C) or
// (N, C, d1, ..., dk) with the class dimension at index 1. A "row" is one position
// (n, d1, ..., dk); per-row outputs have the logits' shape without the class dimension.
// (distillation_loss takes the class dimension from its `dim` option instead.)
//
// Aliasing: an output may be exactly an input only as the in-place gradient over the logits
// (`grad` with the input's data, dtype, shape and strides). Any other overlap is an error:
// an output with another input (target, teacher, weight, mask, top-k arrays), outputs with
// each other, an output with itself (a zero or colliding stride), and, when the gradient is
// written in place, another input with the logits. Inputs that are only read may overlap.
// Views whose byte ranges interleave but provably share no byte (x[:, ::2] and x[:, 1::2],
// two rows or columns of one matrix) are apart; an overlap not decidable cheaply is refused.
// Every size, stride and byte-offset computation is overflow-checked, and enum arguments
// (dtype, reduction, divergence) must hold one of their named values.
#pragma once

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>

namespace softce {

// ---------------------------------------------------------------------------------------
// errors

// Which Python exception the Python front raises for an error (ValueError, IndexError,
// TypeError); C++ callers usually only need what().
enum class error_kind { value, index, type };

class error : public std::invalid_argument {
 public:
  explicit error(const std::string& message, error_kind kind = error_kind::value)
      : std::invalid_argument(message), kind_(kind) {}
  error_kind kind() const noexcept { return kind_; }

 private:
  error_kind kind_;
};

// ---------------------------------------------------------------------------------------
// element types and array views

// 16-bit float storage types (the arithmetic is always done in float32).
struct bfloat16 { std::uint16_t bits; };
struct float16 { std::uint16_t bits; };

enum class dtype : std::uint8_t { float32, float64, bfloat16, float16, int32, int64, boolean };

std::string_view dtype_name(dtype type) noexcept;
std::size_t dtype_size(dtype type) noexcept;

template <class T> constexpr dtype dtype_of();
template <> constexpr dtype dtype_of<float>() { return dtype::float32; }
template <> constexpr dtype dtype_of<double>() { return dtype::float64; }
template <> constexpr dtype dtype_of<bfloat16>() { return dtype::bfloat16; }
template <> constexpr dtype dtype_of<float16>() { return dtype::float16; }
template <> constexpr dtype dtype_of<std::int32_t>() { return dtype::int32; }
template <> constexpr dtype dtype_of<std::int64_t>() { return dtype::int64; }
template <> constexpr dtype dtype_of<bool>() { return dtype::boolean; }

inline constexpr int max_dims = 8;

// A strided n-dimensional array. Strides are in elements (not bytes) and may be zero
// (broadcast) or negative. `Pointer` is `const void*` for inputs and `void*` for outputs.
template <class Pointer>
struct basic_view {
  Pointer data = nullptr;
  dtype type = dtype::float32;
  int ndim = 0;
  std::int64_t shape[max_dims] = {};
  std::int64_t strides[max_dims] = {};

  // The number of elements; saturates at INT64_MAX when the product of the sizes overflows
  // (every function rejects such a view).
  std::int64_t numel() const noexcept {
    for (int i = 0; i < ndim; ++i)
      if (shape[i] == 0) return 0;
    std::int64_t n = 1;
    for (int i = 0; i < ndim; ++i)
      if (__builtin_mul_overflow(n, shape[i], &n)) return INT64_MAX;
    return n;
  }
  // An output view converts to an input view (never the other way round).
  operator basic_view<const void*>() const noexcept
    requires std::is_same_v<Pointer, void*>
  {
    basic_view<const void*> v;
    v.data = data;
    v.type = type;
    v.ndim = ndim;
    for (int i = 0; i < ndim; ++i) v.shape[i] = shape[i], v.strides[i] = strides[i];
    return v;
  }
};

using array_view = basic_view<const void*>;
using mutable_array_view = basic_view<void*>;

namespace detail {
// Fills shape and strides; throws softce::error for more than max_dims dimensions or a
// negative size. Contiguous row-major strides when `strides` is empty.
void fill_view_layout(int& ndim, std::int64_t* shape_out, std::int64_t* strides_out,
                      std::initializer_list<std::int64_t> shape,
                      std::initializer_list<std::int64_t> strides);
}  // namespace detail

// view(pointer, {shape...}) is a C-contiguous view; view(pointer, {shape...}, {strides...})
// a strided one (strides in elements). A const pointer gives an input view, a non-const
// pointer an output view.
template <class T>
array_view view(const T* data, std::initializer_list<std::int64_t> shape,
                std::initializer_list<std::int64_t> strides = {}) {
  array_view v;
  v.data = data;
  v.type = dtype_of<T>();
  detail::fill_view_layout(v.ndim, v.shape, v.strides, shape, strides);
  return v;
}
template <class T>
mutable_array_view view(T* data, std::initializer_list<std::int64_t> shape,
                        std::initializer_list<std::int64_t> strides = {}) {
  mutable_array_view v;
  v.data = data;
  v.type = dtype_of<T>();
  detail::fill_view_layout(v.ndim, v.shape, v.strides, shape, strides);
  return v;
}

// ---------------------------------------------------------------------------------------
// options shared by the losses

// none: per-row (or, for the element-wise losses, per-element) losses;
// mean / sum / batchmean: as documented on each loss.
enum class reduction { none, mean, sum, batchmean };
enum class divergence { kl, reverse_kl, jsd };

// Parse the names used by PyTorch ("none", "mean", "sum", "batchmean") and by
// distillation_loss ("kl", "reverse_kl", "jsd"); throw softce::error otherwise.
reduction parse_reduction(std::string_view name);
divergence parse_divergence(std::string_view name);
std::string_view reduction_name(reduction r) noexcept;
std::string_view divergence_name(divergence d) noexcept;

// Where the results go. Every output is optional. An output overlaps no input and no other
// output, except `grad` being exactly the input (see "Aliasing" at the top).
//  grad:   d loss / d input, same shape as the input (any strides; it may be the input
//          itself, which is then overwritten: "in-place backward"). Written in the input's
//          dtype or any float dtype.
//  losses: with reduction::none, the unreduced losses (per row, or per element for kl_div
//          and binary_cross_entropy_with_logits). Any float dtype, any strides.
//  grad_target: d loss / d target, same shape as the target, computed in the same pass:
//          probability targets of cross_entropy (and cross_entropy_with_probs), the target
//          of kl_div and of binary_cross_entropy_with_logits, the teacher logits of
//          distillation_loss (so that both branches of a symmetric KL train). Any float
//          dtype, any strides; it overlaps nothing (no input, no other output). Asking for
//          it with class-index or top-k targets is an error. It is the exact derivative of
//          the documented loss (docs/semantics.md, "Target gradients"): it depends on the
//          logits, weights and the other side, so a NaN there makes it NaN; a NaN target
//          makes the loss NaN while this derivative, not a function of that value, may stay
//          finite (as in PyTorch).
// With reduction::none the gradients written are those of the SUM of the unreduced losses,
// and the function returns that sum.
struct outputs {
  std::optional<mutable_array_view> grad;
  std::optional<mutable_array_view> losses;
  std::optional<mutable_array_view> grad_target;
};

// Sparse top-k targets: for each row, K class indices (int32 or int64, shape (..., K) with
// the row shape in front) and their probabilities (float, same shape).
// Without `tail`: exactly the dense target obtained by scattering `values` into zeros.
// With `tail`: adds the bucket term -(1 - sum values) * log(1 - sum_k q_k) for the mass
// outside the top k. Duplicate or out-of-range indices are errors.
struct topk {
  array_view indices;
  array_view values;
  bool tail = false;
};

// ---------------------------------------------------------------------------------------
// cross-entropy

struct cross_entropy_options {
  std::optional<array_view> weight;   // (C,) class weights
  std::int64_t ignore_index = -100;   // index targets only
  reduction reduce = reduction::mean; // none, mean, sum
  double label_smoothing = 0.0;       // in [0, 1]
  std::optional<array_view> mask;     // bool per row; false excludes the row
                                      // (probability and top-k targets only)
};

// torch.nn.functional.cross_entropy. `target` holds class indices (int32/int64, row shape)
// or class probabilities (float, same shape as input). Mean reduction divides by the summed
// weight of the non-ignored targets for index targets (as torch does) and by the number of
// (unmasked) rows for probability and top-k targets. Returns the reduced loss.
double cross_entropy(const array_view& input, const array_view& target,
                     const cross_entropy_options& options = {}, const outputs& out = {});
double cross_entropy(const array_view& input, const topk& target,
                     const cross_entropy_options& options = {}, const outputs& out = {});

// Snorkel's cross_entropy_with_probs: probability targets, optional class weight,
// reduction none / mean / sum. Mathematically the probability-target cross_entropy.
double cross_entropy_with_probs(const array_view& input, const array_view& target,
                                std::optional<array_view> weight = std::nullopt,
                                reduction reduce = reduction::mean, const outputs& out = {});

// ---------------------------------------------------------------------------------------
// element-wise losses

struct kl_div_options {
  reduction reduce = reduction::mean;  // none, mean (over elements), sum, batchmean (/ size(0))
  bool log_target = false;
};

// torch.nn.functional.kl_div: `input` holds log-probabilities, `target` probabilities
// (log-probabilities with log_target). Same shape, any shape. A zero target contributes 0
// even where the input is -inf (torch gives NaN there).
double kl_div(const array_view& input, const array_view& target,
              const kl_div_options& options = {}, const outputs& out = {});

struct bce_options {
  std::optional<array_view> weight;      // broadcastable to input
  std::optional<array_view> pos_weight;  // broadcastable to input (usually (C,))
  reduction reduce = reduction::mean;    // none, mean (over elements), sum
};

// torch.nn.functional.binary_cross_entropy_with_logits with soft targets in [0, 1].
double binary_cross_entropy_with_logits(const array_view& input, const array_view& target,
                                        const bce_options& options = {},
                                        const outputs& out = {});

// ---------------------------------------------------------------------------------------
// knowledge distillation

struct distillation_options {
  double temperature = 1.0;               // > 0
  divergence kind = divergence::kl;
  double beta = 0.5;                      // jsd mixture weight, in [0, 1]
  reduction reduce = reduction::batchmean;// none (per row), sum, batchmean (/ unmasked rows),
                                          // mean (/ unmasked rows / C)
  std::optional<array_view> mask;         // bool per row; false excludes the row
  // The class dimension of the logits (negative counts from the end). Optional for 1-d and
  // 2-d logits (the last dimension); required for 3 or more dimensions, where the layout is
  // ambiguous: dim = 1 for PyTorch's (N, C, d1, ...), dim = -1 for a language model's
  // (batch, sequence, vocabulary). Rows are the other dimensions in their order: the mask,
  // per-row losses and top-k arrays have the logits' shape without dimension `dim` (top-k
  // arrays then (..., K)); the teacher logits and the gradient have the logits' shape.
  std::optional<int> dim;
};

// With p = softmax(teacher / T), q = softmax(student / T):
//   kl:         T^2 * KL(p || q)
//   reverse_kl: T^2 * KL(q || p)
//   jsd:        T^2 * (beta KL(p || m) + (1 - beta) KL(q || m)), m = beta p + (1 - beta) q,
//               with TRL's endpoints: beta = 0 is kl, beta = 1 is reverse_kl.
// The teacher is logits (same shape as the student) or a top-k of probabilities (taken as
// p directly; `tail` only with kind = kl). The gradient is with respect to the student.
double distillation_loss(const array_view& student_logits, const array_view& teacher_logits,
                         const distillation_options& options = {}, const outputs& out = {});
double distillation_loss(const array_view& student_logits, const topk& teacher,
                         const distillation_options& options = {}, const outputs& out = {});

// ---------------------------------------------------------------------------------------
// threads

// Number of threads the losses use (default: the number of hardware threads). Small inputs
// always run on the calling thread. Results are bitwise identical for any thread count.
void set_num_threads(int threads);
int get_num_threads() noexcept;

// Name of the SIMD target chosen at run time (e.g. "AVX2", "AVX3").
std::string simd_target();

}  // namespace softce
