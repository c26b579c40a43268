// Every validation error, with its exact message text (as produced by src/validate.cpp and
// the entry points) and its kind; an error leaves the outputs untouched.
#include "test_support.hpp"

#include <chrono>

namespace softce_test {
namespace {

using softce::error_kind;
using softce::reduction;

template <class F>
void expect_error(F&& call, const std::string& message, error_kind kind) {
  try {
    call();
    ADD_FAILURE() << "no error thrown; expected: " << message;
  } catch (const softce::error& e) {
    EXPECT_EQ(std::string(e.what()), message);
    EXPECT_EQ(static_cast<int>(e.kind()), static_cast<int>(kind)) << e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type: " << e.what();
  }
}

#define EXPECT_SOFTCE_ERROR(call, message, kind) \
  do {                                           \
    SCOPED_TRACE(#call);                         \
    expect_error([&] { call; }, message, kind);  \
  } while (0)

constexpr error_kind value_error = error_kind::value;
constexpr error_kind index_error = error_kind::index;
constexpr error_kind type_error = error_kind::type;

// A view of `shape` over a generous buffer (strides row-major), for shape errors.
struct buffers {
  std::vector<double> f64 = std::vector<double>(4096, 0.25);
  std::vector<float> f32 = std::vector<float>(4096, 0.25f);
  std::vector<std::int64_t> i64 = std::vector<std::int64_t>(4096, 1);
  std::vector<std::int32_t> i32 = std::vector<std::int32_t>(4096, 1);
  std::vector<unsigned char> b = std::vector<unsigned char>(4096, 1);
};

template <class T>
array_view make_view(const T* data, dtype type, shape_t shape, shape_t strides = {}) {
  array_view v;
  v.data = data;
  v.type = type;
  v.ndim = static_cast<int>(shape.size());
  std::int64_t s = 1;
  for (int d = v.ndim - 1; d >= 0; --d) {
    v.shape[d] = shape[d];
    v.strides[d] = strides.empty() ? s : strides[d];
    if (strides.empty()) s *= std::max<std::int64_t>(shape[d], 1);
  }
  return v;
}

class Errors : public ::testing::Test {
 protected:
  buffers buf;
  array_view f64(shape_t s, shape_t strides = {}) { return make_view(buf.f64.data(), dtype::float64, s, strides); }
  array_view f32(shape_t s) { return make_view(buf.f32.data(), dtype::float32, s); }
  array_view i64(shape_t s) { return make_view(buf.i64.data(), dtype::int64, s); }
  array_view i32(shape_t s) { return make_view(buf.i32.data(), dtype::int32, s); }
  array_view boolean(shape_t s) { return make_view(reinterpret_cast<const bool*>(buf.b.data()), dtype::boolean, s); }
  mutable_array_view out64(shape_t s) {
    mutable_array_view v;
    const array_view a = f64(s);
    v.data = const_cast<void*>(a.data);
    v.type = a.type;
    v.ndim = a.ndim;
    for (int d = 0; d < a.ndim; ++d) v.shape[d] = a.shape[d], v.strides[d] = a.strides[d];
    return v;
  }
};

// ---------------------------------------------------------------------------------------
// names

TEST_F(Errors, ParseReductionAndDivergence) {
  EXPECT_EQ(softce::parse_reduction("none"), reduction::none);
  EXPECT_EQ(softce::parse_reduction("mean"), reduction::mean);
  EXPECT_EQ(softce::parse_reduction("sum"), reduction::sum);
  EXPECT_EQ(softce::parse_reduction("batchmean"), reduction::batchmean);
  EXPECT_EQ(softce::parse_divergence("kl"), softce::divergence::kl);
  EXPECT_EQ(softce::parse_divergence("reverse_kl"), softce::divergence::reverse_kl);
  EXPECT_EQ(softce::parse_divergence("jsd"), softce::divergence::jsd);
  EXPECT_SOFTCE_ERROR(softce::parse_reduction("avg"),
                      "parse_reduction: unknown reduction 'avg' (expected 'none', 'mean', 'sum' or 'batchmean')",
                      value_error);
  EXPECT_SOFTCE_ERROR(softce::parse_reduction("Mean"),
                      "parse_reduction: unknown reduction 'Mean' (expected 'none', 'mean', 'sum' or 'batchmean')",
                      value_error);
  EXPECT_SOFTCE_ERROR(softce::parse_divergence("x"),
                      "parse_divergence: unknown divergence 'x' (expected 'kl', 'reverse_kl' or 'jsd')", value_error);
  EXPECT_SOFTCE_ERROR(softce::parse_divergence(""),
                      "parse_divergence: unknown divergence '' (expected 'kl', 'reverse_kl' or 'jsd')", value_error);
  EXPECT_EQ(softce::reduction_name(reduction::batchmean), "batchmean");
  EXPECT_EQ(softce::divergence_name(softce::divergence::reverse_kl), "reverse_kl");
}

// ---------------------------------------------------------------------------------------
// cross_entropy

TEST_F(Errors, CrossEntropyInput) {
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({}), f64({})),
                      "cross_entropy: input: expected shape (C), (N, C) or (N, C, d1, ...), got a 0-dimensional array",
                      value_error);
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(i32({4, 10}), i64({4})),
                      "cross_entropy: input: expected a float32, float64, bfloat16 or float16 array, got int32",
                      type_error);
  array_view null_input = f64({4, 10});
  null_input.data = nullptr;
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(null_input, i64({4})), "cross_entropy: input: expected data, got a null pointer",
                      value_error);
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({-1, 10}), i64({4})),
                      "cross_entropy: input: expected non-negative sizes, got shape (-1, 10)", value_error);
}

TEST_F(Errors, CrossEntropyIndexTargets) {
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({4, 10}), i64({5})),
                      "cross_entropy: target: expected shape (4) (the input's without the class dimension), got (5)",
                      value_error);
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({4, 10, 3}), i64({4, 10})),
                      "cross_entropy: target: expected shape (4, 3) (the input's without the class dimension), got (4, 10)",
                      value_error);
  std::vector<std::int64_t> y{1, 2, 3, 12};
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({4, 10}), make_view(y.data(), dtype::int64, {4})),
                      "cross_entropy: target: class index 12 at row 3 is out of range for 10 classes", index_error);
  std::vector<std::int32_t> y32{1, -1, 3, 4};
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({4, 10}), make_view(y32.data(), dtype::int32, {4})),
                      "cross_entropy: target: class index -1 at row 1 is out of range for 10 classes", index_error);
  // ignore_index is not an error, even out of range
  EXPECT_NO_THROW(softce::cross_entropy(f64({4, 10}), make_view(std::vector<std::int64_t>{-100, 1, 2, 3}.data(), dtype::int64, {4})));
  softce::cross_entropy_options masked;
  masked.mask = boolean({4});
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({4, 10}), i64({4}), masked),
                      "cross_entropy: mask: expected no mask with class-index targets (use ignore_index)", value_error);
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({4, 10}), make_view(reinterpret_cast<const bool*>(buf.b.data()), dtype::boolean, {4})),
                      "cross_entropy: target: expected class indices (int32/int64) or probabilities (float), got bool",
                      type_error);
}

TEST_F(Errors, CrossEntropyProbabilityTargets) {
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({4, 10}), f64({4, 9})),
                      "cross_entropy: target: expected shape (4, 10) (the input's), got (4, 9)", value_error);
  softce::cross_entropy_options o;
  o.mask = boolean({3});
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({4, 10}), f64({4, 10}), o),
                      "cross_entropy: mask: expected shape (4) (the input's without the class dimension), got (3)",
                      value_error);
  o.mask = f32({4});
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({4, 10}), f64({4, 10}), o), "cross_entropy: mask: expected a bool array, got float32",
                      type_error);
  // as torch: "ignore_index is not supported for floating point target" (negative values pass)
  softce::cross_entropy_options ignore;
  ignore.ignore_index = 3;
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({4, 10}), f64({4, 10}), ignore),
                      "cross_entropy: ignore_index: expected no ignore_index with probability targets (use mask), got 3",
                      value_error);
  ignore.ignore_index = -1;
  EXPECT_NO_THROW(softce::cross_entropy(f64({4, 10}), f64({4, 10}), ignore));
}

// A top-k target is a probability target: ignore_index is treated the same way whether or
// not class weights / label smoothing are given.
TEST_F(Errors, TopKTargetsTreatIgnoreIndexAlikeWithAndWithoutWeights) {
  std::vector<std::int64_t> idx{0, 1, 2, 3, 4, 5, 6, 7};
  const array_view i = make_view(idx.data(), dtype::int64, {4, 2});
  softce::cross_entropy_options plain, weighted;
  plain.ignore_index = weighted.ignore_index = 3;
  weighted.weight = f64({10});
  auto outcome = [&](const softce::cross_entropy_options& o) -> std::string {
    try {
      softce::cross_entropy(f64({4, 10}), softce::topk{i, f64({4, 2})}, o);
      return "no error";
    } catch (const softce::error& e) {
      return e.what();
    }
  };
  EXPECT_EQ(outcome(plain), outcome(weighted));
}

TEST_F(Errors, CrossEntropyOptions) {
  softce::cross_entropy_options o;
  o.label_smoothing = 1.5;
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({4, 10}), i64({4}), o),
                      "cross_entropy: label_smoothing: expected a value in [0, 1], got 1.5", value_error);
  o.label_smoothing = -0.25;
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({4, 10}), f64({4, 10}), o),
                      "cross_entropy: label_smoothing: expected a value in [0, 1], got -0.25", value_error);
  o.label_smoothing = nan;
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({4, 10}), f64({4, 10}), o),
                      "cross_entropy: label_smoothing: expected a value in [0, 1], got nan", value_error);
  o.label_smoothing = 1.0;  // the end points are valid
  EXPECT_NO_THROW(softce::cross_entropy(f64({4, 10}), f64({4, 10}), o));
  o.label_smoothing = 0;
  o.weight = f64({9});
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({4, 10}), i64({4}), o),
                      "cross_entropy: weight: expected shape (10) (one value per class), got (9)", value_error);
  o.weight = i64({10});
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({4, 10}), i64({4}), o),
                      "cross_entropy: weight: expected a float32, float64, bfloat16 or float16 array, got int64", type_error);
  softce::cross_entropy_options r;
  r.reduce = reduction::batchmean;
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({4, 10}), i64({4}), r),
                      "cross_entropy: reduction: expected one of 'none', 'mean', 'sum', got 'batchmean'", value_error);
}

TEST_F(Errors, Outputs) {
  softce::outputs out;
  out.grad = out64({4, 9});
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({4, 10}), i64({4}), {}, out),
                      "cross_entropy: grad: expected shape (4, 10) (the input's), got (4, 9)", value_error);
  mutable_array_view int_grad = out64({4, 10});
  int_grad.type = dtype::int64;
  out.grad = int_grad;
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({4, 10}), i64({4}), {}, out),
                      "cross_entropy: grad: expected a float32, float64, bfloat16 or float16 array, got int64", type_error);
  softce::outputs losses;
  losses.losses = out64({4});
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({4, 10}), i64({4}), {}, losses),
                      "cross_entropy: losses: expected no losses output unless reduction is 'none', got reduction 'mean'",
                      value_error);
  softce::cross_entropy_options none;
  none.reduce = reduction::none;
  losses.losses = out64({5});
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({4, 10}), i64({4}), none, losses),
                      "cross_entropy: losses: expected shape (4), got (5)", value_error);
  softce::kl_div_options kl;
  kl.reduce = reduction::none;
  losses.losses = out64({4});
  EXPECT_SOFTCE_ERROR(softce::kl_div(f64({4, 10}), f64({4, 10}), kl, losses), "kl_div: losses: expected shape (4, 10), got (4)",
                      value_error);
}

TEST_F(Errors, TopKTargets) {
  std::vector<std::int64_t> idx{0, 1, 2, 3, 4, 5, 6, 7, 12, 9, 8, 7};
  std::vector<double> val(12, 0.1);
  const array_view v = make_view(val.data(), dtype::float64, {4, 3});
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({4, 10}), softce::topk{make_view(idx.data(), dtype::int64, {4, 3}), v}),
                      "cross_entropy: target.indices: index 12 at row 2 is out of range for 10 classes", index_error);
  std::vector<std::int64_t> dup{0, 1, 2, 3, 4, 5, 6, 7, 8, 7, 1, 7};
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({4, 10}), softce::topk{make_view(dup.data(), dtype::int64, {4, 3}), v}),
                      "cross_entropy: target.indices: duplicate index 7 in row 3", value_error);
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({4, 10}), softce::topk{i64({4}), f64({4})}),
                      "cross_entropy: target.indices: expected shape (4) + (K,) (the input's rows, then K), got (4)",
                      value_error);
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({4, 10}), softce::topk{i64({5, 3}), f64({5, 3})}),
                      "cross_entropy: target.indices: expected shape (4) + (K,) (the input's rows, then K), got (5, 3)",
                      value_error);
  std::vector<std::int64_t> ok{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1};
  const array_view good = make_view(ok.data(), dtype::int64, {4, 3});
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({4, 10}), softce::topk{good, f64({4, 2})}),
                      "cross_entropy: target.values: expected shape (4, 3) (the indices'), got (4, 2)", value_error);
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({4, 10}), softce::topk{f64({4, 3}), v}),
                      "cross_entropy: target.indices: expected an int32 or int64 array, got float64", type_error);
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({4, 10}), softce::topk{good, i64({4, 3})}),
                      "cross_entropy: target.values: expected a float32, float64, bfloat16 or float16 array, got int64",
                      type_error);
  softce::cross_entropy_options o;
  o.label_smoothing = 0.1;
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({4, 10}), softce::topk{good, v, true}, o),
                      "cross_entropy: target.tail: expected no class weight and no label smoothing with a tail bucket",
                      value_error);
  softce::cross_entropy_options w;
  w.weight = f64({10});
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({4, 10}), softce::topk{good, v, true}, w),
                      "cross_entropy: target.tail: expected no class weight and no label smoothing with a tail bucket",
                      value_error);
  softce::distillation_options d;
  EXPECT_SOFTCE_ERROR(softce::distillation_loss(f64({4, 10}), softce::topk{make_view(dup.data(), dtype::int64, {4, 3}), v}, d),
                      "distillation_loss: teacher.indices: duplicate index 7 in row 3", value_error);
}

TEST_F(Errors, Distillation) {
  softce::distillation_options o;
  o.temperature = 0;
  EXPECT_SOFTCE_ERROR(softce::distillation_loss(f64({2, 3}), f64({2, 3}), o),
                      "distillation_loss: temperature: expected a finite value > 0, got 0", value_error);
  o.temperature = -1;
  EXPECT_SOFTCE_ERROR(softce::distillation_loss(f64({2, 3}), f64({2, 3}), o),
                      "distillation_loss: temperature: expected a finite value > 0, got -1", value_error);
  o.temperature = inf;
  EXPECT_SOFTCE_ERROR(softce::distillation_loss(f64({2, 3}), f64({2, 3}), o),
                      "distillation_loss: temperature: expected a finite value > 0, got inf", value_error);
  o.temperature = 1;
  o.beta = 2;
  EXPECT_SOFTCE_ERROR(softce::distillation_loss(f64({2, 3}), f64({2, 3}), o),
                      "distillation_loss: beta: expected a value in [0, 1], got 2", value_error);
  o.beta = -0.5;
  EXPECT_SOFTCE_ERROR(softce::distillation_loss(f64({2, 3}), f64({2, 3}), o),
                      "distillation_loss: beta: expected a value in [0, 1], got -0.5", value_error);
  o.beta = 0.5;
  EXPECT_SOFTCE_ERROR(softce::distillation_loss(f64({2, 3}), f64({2, 4}), o),
                      "distillation_loss: teacher: expected shape (2, 3) (the student's), got (2, 4)", value_error);
  o.kind = softce::divergence::jsd;
  std::vector<std::int64_t> idx{0, 1};
  EXPECT_SOFTCE_ERROR(
      softce::distillation_loss(f64({2, 3}), softce::topk{make_view(idx.data(), dtype::int64, {2, 1}), f64({2, 1})}, o),
      "distillation_loss: teacher: expected teacher logits for divergence 'jsd' (a top-k teacher supports 'kl' only)",
      value_error);
  softce::distillation_options m;
  m.mask = boolean({3});
  EXPECT_SOFTCE_ERROR(softce::distillation_loss(f64({2, 3}), f64({2, 3}), m),
                      "distillation_loss: mask: expected shape (2) (the input's without the class dimension), got (3)",
                      value_error);
}

TEST_F(Errors, ElementwiseLosses) {
  EXPECT_SOFTCE_ERROR(softce::kl_div(f64({2, 3}), f64({3, 2})), "kl_div: target: expected shape (2, 3) (the input's), got (3, 2)",
                      value_error);
  EXPECT_SOFTCE_ERROR(softce::kl_div(f64({2, 3}), i64({2, 3})),
                      "kl_div: target: expected a float32, float64, bfloat16 or float16 array, got int64", type_error);
  softce::bce_options o;
  o.weight = f64({4});
  EXPECT_SOFTCE_ERROR(softce::binary_cross_entropy_with_logits(f64({2, 3}), f64({2, 3}), o),
                      "binary_cross_entropy_with_logits: weight: expected a shape broadcastable to (2, 3) (the input's), got (4)",
                      value_error);
  o.weight.reset();
  o.pos_weight = f64({2, 2, 3});
  EXPECT_SOFTCE_ERROR(softce::binary_cross_entropy_with_logits(f64({2, 3}), f64({2, 3}), o),
                      "binary_cross_entropy_with_logits: pos_weight: expected a shape broadcastable to (2, 3) (the input's), got (2, 2, 3)",
                      value_error);
  softce::bce_options r;
  r.reduce = reduction::batchmean;
  EXPECT_SOFTCE_ERROR(softce::binary_cross_entropy_with_logits(f64({2, 3}), f64({2, 3}), r),
                      "binary_cross_entropy_with_logits: reduction: expected one of 'none', 'mean', 'sum', got 'batchmean'",
                      value_error);
}

TEST_F(Errors, CrossEntropyWithProbs) {
  EXPECT_SOFTCE_ERROR(softce::cross_entropy_with_probs(f64({2, 3}), i64({2})),
                      "cross_entropy_with_probs: target: expected probabilities (float), got int64", type_error);
  // errors found by the shared cross-entropy checks still name the function called
  EXPECT_SOFTCE_ERROR(softce::cross_entropy_with_probs(f64({2, 3}), f64({2, 4})),
                      "cross_entropy_with_probs: target: expected shape (2, 3) (the input's), got (2, 4)", value_error);
  EXPECT_SOFTCE_ERROR(softce::cross_entropy_with_probs(f64({2, 3}), f64({2, 3}), f64({4})),
                      "cross_entropy_with_probs: weight: expected shape (3) (one value per class), got (4)", value_error);
  EXPECT_SOFTCE_ERROR(softce::cross_entropy_with_probs(f64({2, 3}), f64({2, 3}), std::nullopt, reduction::batchmean),
                      "cross_entropy_with_probs: reduction: expected one of 'none', 'mean', 'sum', got 'batchmean'",
                      value_error);
}

// A view whose element count, or whose largest offset in bytes, overflows int64.
TEST_F(Errors, SizeOverflow) {
  const std::int64_t big = std::int64_t{1} << 32;
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({big, big}, {1, 1}), i64({big})),
                      "cross_entropy: input: size of shape (4294967296, 4294967296) overflows 64-bit indexing", value_error);
  EXPECT_SOFTCE_ERROR(softce::kl_div(f64({big, big, 2}, {0, 0, 0}), f64({big, big, 2}, {0, 0, 0})),
                      "kl_div: input: size of shape (4294967296, 4294967296, 2) overflows 64-bit indexing", value_error);
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({2, 3}, {std::int64_t{1} << 62, 1}), i64({2})),
                      "cross_entropy: input: strides of shape (2, 3) overflow 64-bit indexing", value_error);
  std::vector<std::int64_t> y{0, 1};
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({2, 3}), make_view(y.data(), dtype::int64, {2}, {-(std::int64_t{1} << 62)})),
                      "cross_entropy: target: strides of shape (2) overflow 64-bit indexing", value_error);
}

// Checked arithmetic: every shape, stride and byte-offset computation (UBSan found shape
// products and stride negation overflowing here).
TEST_F(Errors, CheckedArithmetic) {
  constexpr std::int64_t min64 = std::numeric_limits<std::int64_t>::min(), max64 = std::numeric_limits<std::int64_t>::max();
  // INT64_MIN stride (its negation overflows)
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({2, 3}, {min64, 1}), i64({2})),
                      "cross_entropy: input: strides of shape (2, 3) overflow 64-bit indexing", value_error);
  EXPECT_SOFTCE_ERROR(softce::kl_div(f64({2, 3}), f64({2, 3}, {3, min64})),
                      "kl_div: target: strides of shape (2, 3) overflow 64-bit indexing", value_error);
  // ... harmless over a dimension of size 1, where it is never multiplied
  std::vector<std::int64_t> y{0, 1};
  EXPECT_NO_THROW(softce::cross_entropy(f64({2, 3, 1}, {3, 1, min64}), make_view(y.data(), dtype::int64, {2, 1})));
  // the largest element offset fits, the offset in bytes does not
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({2, 3}, {max64 / 4, 1}), i64({2})),
                      "cross_entropy: input: strides of shape (2, 3) overflow 64-bit indexing", value_error);
  // spans below and above the data pointer that each fit but not together
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({2, 2}, {max64 / 12, -(max64 / 12)}), i64({2})),
                      "cross_entropy: input: strides of shape (2, 2) overflow 64-bit indexing", value_error);
  // the sum of the spans of several dimensions
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({3, 3}, {max64 / 3, max64 / 3}), i64({3})),
                      "cross_entropy: input: strides of shape (3, 3) overflow 64-bit indexing", value_error);
  // addresses that wrap around below zero from the data pointer
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({2, 3}, {-(std::int64_t{1} << 58), 1}), i64({2})),
                      "cross_entropy: input: strides of shape (2, 3) reach outside the address space from the data pointer",
                      value_error);
  // shape products: the size, and the row count of a class dimension of 0
  const std::int64_t big = std::int64_t{1} << 40;
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({big, big, big}, {0, 0, 0}), make_view(buf.i64.data(), dtype::int64, {big, big}, {0, 0})),
                      "cross_entropy: input: size of shape (1099511627776, 1099511627776, 1099511627776) overflows 64-bit indexing",
                      value_error);
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({big, 0, big}, {0, 0, 0}), make_view(buf.i64.data(), dtype::int64, {big, big}, {0, 0})),
                      "cross_entropy: input: number of rows of shape (1099511627776, 0, 1099511627776) overflows 64-bit indexing",
                      value_error);
  EXPECT_SOFTCE_ERROR(softce::view(buf.f64.data(), {big, big, big}),
                      "view: size of shape (1099511627776, 1099511627776, 1099511627776) overflows 64-bit indexing", value_error);
  // numel() saturates instead of overflowing
  array_view huge = f64({big, big, big}, {0, 0, 0});
  EXPECT_EQ(huge.numel(), max64);
  huge.shape[2] = 0;
  EXPECT_EQ(huge.numel(), 0);
  // a top-k row's K, and a mask, with the same checks
  softce::distillation_options m;
  m.mask = make_view(reinterpret_cast<const bool*>(buf.b.data()), dtype::boolean, {2}, {min64});
  EXPECT_SOFTCE_ERROR(softce::distillation_loss(f64({2, 3}), f64({2, 3}), m),
                      "distillation_loss: mask: strides of shape (2) overflow 64-bit indexing", value_error);
}

// Enum arguments hold one of their named values.
TEST_F(Errors, EnumsOutOfRange) {
  softce::cross_entropy_options ce;
  ce.reduce = static_cast<reduction>(7);
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({2, 3}), i64({2}), ce),
                      "cross_entropy: reduction: expected one of 'none', 'mean', 'sum', got invalid value 7", value_error);
  softce::kl_div_options kl;
  kl.reduce = static_cast<reduction>(200);
  EXPECT_SOFTCE_ERROR(softce::kl_div(f64({2, 3}), f64({2, 3}), kl),
                      "kl_div: reduction: expected one of 'none', 'mean', 'sum', 'batchmean', got invalid value 200",
                      value_error);
  softce::distillation_options d;
  d.reduce = static_cast<reduction>(4);
  EXPECT_SOFTCE_ERROR(softce::distillation_loss(f64({2, 3}), f64({2, 3}), d),
                      "distillation_loss: reduction: expected 'none', 'mean', 'sum' or 'batchmean', got invalid value 4",
                      value_error);
  array_view bad = f64({2, 3});
  bad.type = static_cast<dtype>(9);
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(bad, i64({2})), "cross_entropy: input: expected a valid dtype, got dtype value 9",
                      type_error);
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(f64({2, 3}), bad), "cross_entropy: target: expected a valid dtype, got dtype value 9",
                      type_error);
  softce::outputs out;
  mutable_array_view g = out64({2, 3});
  g.type = static_cast<dtype>(255);
  out.grad = g;
  EXPECT_SOFTCE_ERROR(softce::kl_div(f64({2, 3}), f64({2, 3}, {0, 1}), {}, out),
                      "kl_div: grad: expected a valid dtype, got dtype value 255", type_error);
  EXPECT_EQ(softce::dtype_size(static_cast<dtype>(9)), 0u);
  EXPECT_EQ(softce::dtype_name(static_cast<dtype>(9)), "unknown");
}

// (: needs the entry points to call detail::distillation_layout; enabled with that patch)
TEST_F(Errors, DivergenceOutOfRange) {
  softce::distillation_options k;
  k.kind = static_cast<softce::divergence>(7);
  EXPECT_SOFTCE_ERROR(softce::distillation_loss(f64({2, 3}), f64({2, 3}), k),
                      "distillation_loss: divergence: expected 'kl', 'reverse_kl' or 'jsd', got invalid value 7", value_error);
  std::vector<std::int64_t> idx{0, 1};
  EXPECT_SOFTCE_ERROR(
      softce::distillation_loss(f64({2, 3}), softce::topk{make_view(idx.data(), dtype::int64, {2, 1}), f64({2, 1})}, k),
      "distillation_loss: divergence: expected 'kl', 'reverse_kl' or 'jsd', got invalid value 7", value_error);
}

// distillation_loss's class dimension. (: as above)
TEST_F(Errors, DistillationDim) {
  softce::distillation_options d;
  EXPECT_SOFTCE_ERROR(softce::distillation_loss(f64({2, 3, 4}), f64({2, 3, 4}), d),
                      "distillation_loss: dim: class dimension ambiguous for 3-dimensional logits; pass dim=1 for "
                      "(N, C, d1, ...) layout or dim=-1 for (batch, sequence, vocabulary)",
                      value_error);
  std::vector<std::int64_t> idx(2 * 3 * 2, 0);
  EXPECT_SOFTCE_ERROR(
      softce::distillation_loss(f64({2, 3, 4}), softce::topk{make_view(idx.data(), dtype::int64, {2, 3, 1}), f64({2, 3, 1})}, d),
      "distillation_loss: dim: class dimension ambiguous for 3-dimensional logits; pass dim=1 for "
      "(N, C, d1, ...) layout or dim=-1 for (batch, sequence, vocabulary)",
      value_error);
  d.dim = 3;
  EXPECT_SOFTCE_ERROR(softce::distillation_loss(f64({2, 3, 4}), f64({2, 3, 4}), d),
                      "distillation_loss: dim: expected a value in [-3, 2] for 3-dimensional logits, got 3", value_error);
  d.dim = -2;
  EXPECT_SOFTCE_ERROR(softce::distillation_loss(f64({4}), f64({4}), d),
                      "distillation_loss: dim: expected a value in [-1, 0] for 1-dimensional logits, got -2", value_error);
  // shapes are reported as the caller gave them, before the class dimension moves
  d.dim = -1;
  EXPECT_SOFTCE_ERROR(softce::distillation_loss(f64({2, 3, 4}), f64({2, 4, 3}), d),
                      "distillation_loss: teacher: expected shape (2, 3, 4) (the student's), got (2, 4, 3)", value_error);
  softce::outputs out;
  out.grad = out64({2, 4, 3});
  EXPECT_SOFTCE_ERROR(softce::distillation_loss(f64({2, 3, 4}), f64({2, 3, 4}), d, out),
                      "distillation_loss: grad: expected shape (2, 3, 4) (the input's), got (2, 4, 3)", value_error);
  softce::distillation_options m = d;
  m.mask = boolean({2, 4});
  EXPECT_SOFTCE_ERROR(softce::distillation_loss(f64({2, 3, 4}), f64({2, 3, 4}), m),
                      "distillation_loss: mask: expected shape (2, 3) (the input's without the class dimension), got (2, 4)",
                      value_error);
  // 1-d and 2-d logits need no dim; dim 1 of (N, C) and 0 of (C) are the default
  EXPECT_NO_THROW(softce::distillation_loss(f64({2, 3}), f64({2, 3}), softce::distillation_options{}));
  d.dim = 0;
  EXPECT_NO_THROW(softce::distillation_loss(f64({3}), f64({3}), d));
  d.dim = 1;
  EXPECT_NO_THROW(softce::distillation_loss(f64({2, 3, 4}), f64({2, 3, 4}), d));
}

// The top-k duplicate check is O(K log K) per row: K = 20000 with the duplicate last.
TEST_F(Errors, TopKDuplicateCheckIsFast) {
  constexpr std::int64_t rows = 8, k = 20000, classes = 50000;
  std::vector<std::int64_t> idx(rows * k);
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t j = 0; j < k; ++j) idx[static_cast<std::size_t>(r * k + j)] = (j * 7 + r) % classes;
  idx.back() = idx[static_cast<std::size_t>((rows - 1) * k)];
  std::vector<float> val(rows * k, 1.0f / k);
  std::vector<float> x(rows * classes, 0.0f);
  const auto start = std::chrono::steady_clock::now();
  EXPECT_SOFTCE_ERROR(softce::cross_entropy(softce::view(x.data(), {rows, classes}),
                                            softce::topk{softce::view(idx.data(), {rows, k}), softce::view(val.data(), {rows, k})}),
                      "cross_entropy: target.indices: duplicate index 7 in row 7", value_error);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(seconds, 1.0);
}

TEST_F(Errors, ViewFactory) {
  double data[4] = {};
  EXPECT_SOFTCE_ERROR(softce::view(data, {1, 1, 1, 1, 1, 1, 1, 1, 1}), "view: expected at most 8 dimensions, got 9", value_error);
  EXPECT_SOFTCE_ERROR(softce::view(data, {2, 2}, {1}), "view: expected 2 strides, got 1", value_error);
  EXPECT_SOFTCE_ERROR(softce::view(data, {2, -2}), "view: expected non-negative sizes, got -2 in dimension 1", value_error);
}

// Validation happens before any work: an error in the last row leaves the outputs alone.
TEST_F(Errors, AnErrorLeavesTheOutputsUntouched) {
  std::vector<std::int64_t> y{1, 2, 3, 12};
  tensor g({4, 10}, dtype::float64), losses({4}, dtype::float64);
  const std::vector<unsigned char> before = g.element_bytes(), losses_before = losses.element_bytes();
  softce::outputs out;
  out.grad = g.mutable_view();
  out.losses = losses.mutable_view();
  softce::cross_entropy_options none;
  none.reduce = reduction::none;
  EXPECT_THROW(softce::cross_entropy(f64({4, 10}), make_view(y.data(), dtype::int64, {4}), none, out), softce::error);
  EXPECT_EQ(g.element_bytes(), before);
  EXPECT_EQ(losses.element_bytes(), losses_before);
  std::vector<std::int64_t> dup{0, 1, 2, 3, 4, 5, 6, 7, 8, 7, 1, 7};
  std::vector<double> val(12, 0.1);
  EXPECT_THROW(softce::cross_entropy(f64({4, 10}),
                                     softce::topk{make_view(dup.data(), dtype::int64, {4, 3}), make_view(val.data(), dtype::float64, {4, 3})},
                                     none, out),
               softce::error);
  EXPECT_EQ(g.element_bytes(), before);
  EXPECT_EQ(losses.element_bytes(), losses_before);
}

}  // namespace
}  // namespace softce_test
