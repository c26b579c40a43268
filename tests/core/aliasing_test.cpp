// Aliasing rules (softce.hpp, "Aliasing"), hunted over the whole class: for every loss and
// every pair (output, input) and (output, output), the output placed exactly over the other
// array, overlapping it by one element, interleaved with it (sharing its byte range but no
// byte) and fully apart. Only the gradient exactly over the logits (in place) and the apart
// placements are accepted, and an accepted interleaved call gives the same numbers as the
// apart one; every refusal has its exact message. Also outputs that overlap themselves, the
// examples found in issue 9, and the overlap test on its own.
#include "test_support.hpp"

#include "validate.hpp"

#include <cstring>
#include <map>

namespace softce_test {
namespace {

using softce::outputs;
using softce::reduction;

#define EXPECT_THROW_MESSAGE(call, message)                                    \
  do {                                                                         \
    try {                                                                      \
      call;                                                                    \
      ADD_FAILURE() << "no error thrown; expected: " << (message);             \
    } catch (const softce::error& e) {                                         \
      EXPECT_EQ(std::string(e.what()), std::string(message));                  \
    }                                                                          \
  } while (0)

const std::string kRule = "; an output may only be exactly the input (in-place gradient) and must not overlap any other array";

// ---------------------------------------------------------------------------------------
// arrays placed in one arena of 8-byte slots: each element of any dtype sits at the start
// of its own slot, `pitch` slots apart (1: dense, 2: every other slot)

struct placement {
  std::int64_t slot = 0;
  std::int64_t pitch = 1;
};

struct arg_spec {
  std::string name;
  dtype type;
  shape_t shape;
  std::vector<double> values;  // row-major
};

class arena {
 public:
  arena() : slots_(4096, 0) {}
  void clear() { std::fill(slots_.begin(), slots_.end(), 0); }
  mutable_array_view place(dtype type, const shape_t& shape, placement p) {
    mutable_array_view v;
    v.data = reinterpret_cast<char*>(slots_.data()) + p.slot * 8;
    v.type = type;
    v.ndim = static_cast<int>(shape.size());
    const std::int64_t per_slot = 8 / size_of(type);
    std::int64_t stride = p.pitch * per_slot;
    for (int d = v.ndim - 1; d >= 0; --d) {
      v.shape[d] = shape[static_cast<std::size_t>(d)];
      v.strides[d] = stride;
      stride *= std::max<std::int64_t>(shape[static_cast<std::size_t>(d)], 1);
    }
    return v;
  }
  void write(const mutable_array_view& v, const std::vector<double>& values) {
    for (std::size_t i = 0; i < values.size(); ++i) {
      std::int64_t rest = static_cast<std::int64_t>(i), offset = 0;
      for (int d = v.ndim - 1; d >= 0; --d) {
        offset += (rest % v.shape[d]) * v.strides[d];
        rest /= v.shape[d];
      }
      char* p = static_cast<char*>(v.data) + offset * size_of(v.type);
      const double x = values[i];
      switch (v.type) {
        case dtype::float64: std::memcpy(p, &x, 8); break;
        case dtype::float32: { const float f = static_cast<float>(x); std::memcpy(p, &f, 4); break; }
        case dtype::int64: { const std::int64_t n = static_cast<std::int64_t>(x); std::memcpy(p, &n, 8); break; }
        case dtype::int32: { const std::int32_t n = static_cast<std::int32_t>(x); std::memcpy(p, &n, 4); break; }
        case dtype::boolean: *p = x != 0 ? 1 : 0; break;
        default: FAIL() << "unexpected dtype";
      }
    }
  }
  std::vector<double> read(const mutable_array_view& v) const {
    std::vector<double> out(static_cast<std::size_t>(v.numel()));
    for (std::size_t i = 0; i < out.size(); ++i) {
      std::int64_t rest = static_cast<std::int64_t>(i), offset = 0;
      for (int d = v.ndim - 1; d >= 0; --d) {
        offset += (rest % v.shape[d]) * v.strides[d];
        rest /= v.shape[d];
      }
      std::memcpy(&out[i], static_cast<const char*>(v.data) + offset * 8, 8);  // outputs are float64
    }
    return out;
  }

 private:
  std::vector<std::uint64_t> slots_;
};

std::int64_t slots_of(const shape_t& shape) { return product(shape); }

// One loss called with reduction none (so both outputs exist); args[0] is the logits.
struct loss_case {
  std::string fn;
  std::vector<arg_spec> args;
  shape_t losses_shape;
  std::function<double(const std::vector<array_view>&, const outputs&)> call;
};

constexpr std::int64_t N = 3, C = 5, K = 2;

std::vector<double> logits_values() {
  std::vector<double> v(N * C);
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = 0.25 * static_cast<double>(i % 7) - 0.5;
  return v;
}
std::vector<double> probability_values(std::int64_t rows, std::int64_t classes) {
  std::vector<double> v(static_cast<std::size_t>(rows * classes));
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < classes; ++c) v[static_cast<std::size_t>(r * classes + c)] = static_cast<double>(c + r + 1);
  for (std::int64_t r = 0; r < rows; ++r) {
    double s = 0;
    for (std::int64_t c = 0; c < classes; ++c) s += v[static_cast<std::size_t>(r * classes + c)];
    for (std::int64_t c = 0; c < classes; ++c) v[static_cast<std::size_t>(r * classes + c)] /= s;
  }
  return v;
}

std::vector<loss_case> every_loss() {
  const arg_spec input{"input", dtype::float64, {N, C}, logits_values()};
  const arg_spec probs{"target", dtype::float64, {N, C}, probability_values(N, C)};
  const arg_spec labels{"target", dtype::int64, {N}, {1, 4, 0}};
  const arg_spec weight{"weight", dtype::float64, {C}, {0.5, 1, 1.5, 2, 0.75}};
  const arg_spec mask{"mask", dtype::boolean, {N}, {1, 0, 1}};
  const std::vector<double> top_indices{3, 0, 1, 4, 2, 3}, top_values{0.5, 0.25, 0.6, 0.3, 0.7, 0.1};
  std::vector<loss_case> cases;
  auto none = [] {
    softce::cross_entropy_options o;
    o.reduce = reduction::none;
    return o;
  };
  cases.push_back({"cross_entropy", {input, labels, weight}, {N}, [=](const std::vector<array_view>& a, const outputs& out) {
                     auto o = none();
                     o.weight = a[2];
                     return softce::cross_entropy(a[0], a[1], o, out);
                   }});
  cases.push_back({"cross_entropy", {input, probs, weight, mask}, {N}, [=](const std::vector<array_view>& a, const outputs& out) {
                     auto o = none();
                     o.weight = a[2];
                     o.mask = a[3];
                     return softce::cross_entropy(a[0], a[1], o, out);
                   }});
  for (bool with_weight : {false, true}) {
    std::vector<arg_spec> args{input,
                               {"target.indices", dtype::int32, {N, K}, top_indices},
                               {"target.values", dtype::float64, {N, K}, top_values},
                               mask};
    if (with_weight) args.push_back(weight);
    cases.push_back({"cross_entropy", args, {N}, [=](const std::vector<array_view>& a, const outputs& out) {
                       auto o = none();
                       o.mask = a[3];
                       if (with_weight) o.weight = a[4];
                       return softce::cross_entropy(a[0], softce::topk{a[1], a[2], !with_weight}, o, out);
                     }});
  }
  cases.push_back({"cross_entropy_with_probs", {input, probs, weight}, {N},
                   [=](const std::vector<array_view>& a, const outputs& out) {
                     return softce::cross_entropy_with_probs(a[0], a[1], a[2], reduction::none, out);
                   }});
  cases.push_back({"kl_div", {input, probs}, {N, C}, [=](const std::vector<array_view>& a, const outputs& out) {
                     softce::kl_div_options o;
                     o.reduce = reduction::none;
                     return softce::kl_div(a[0], a[1], o, out);
                   }});
  cases.push_back({"binary_cross_entropy_with_logits",
                   {input, probs, {"weight", dtype::float64, {N, C}, probability_values(N, C)},
                    {"pos_weight", dtype::float64, {C}, {1, 2, 3, 4, 5}}},
                   {N, C},
                   [=](const std::vector<array_view>& a, const outputs& out) {
                     softce::bce_options o;
                     o.reduce = reduction::none;
                     o.weight = a[2];
                     o.pos_weight = a[3];
                     return softce::binary_cross_entropy_with_logits(a[0], a[1], o, out);
                   }});
  for (softce::divergence kind : {softce::divergence::kl, softce::divergence::reverse_kl, softce::divergence::jsd}) {
    cases.push_back({"distillation_loss", {input, {"teacher", dtype::float64, {N, C}, probability_values(N, C)}, mask}, {N},
                     [=](const std::vector<array_view>& a, const outputs& out) {
                       softce::distillation_options o;
                       o.reduce = reduction::none;
                       o.kind = kind;
                       o.mask = a[2];
                       return softce::distillation_loss(a[0], a[1], o, out);
                     }});
  }
  cases.push_back({"distillation_loss",
                   {input, {"teacher.indices", dtype::int64, {N, K}, top_indices},
                    {"teacher.values", dtype::float32, {N, K}, top_values}, mask},
                   {N},
                   [=](const std::vector<array_view>& a, const outputs& out) {
                     softce::distillation_options o;
                     o.reduce = reduction::none;
                     o.mask = a[3];
                     return softce::distillation_loss(a[0], softce::topk{a[1], a[2], true}, o, out);
                   }});
  return cases;
}

// Where everything goes by default: each array in its own 64-slot block, dense.
constexpr std::int64_t kBlock = 64;
placement default_place(std::size_t index) { return {static_cast<std::int64_t>(index) * kBlock, 1}; }
constexpr std::size_t kGrad = 12, kLosses = 13;  // the outputs' blocks

struct run_result {
  bool threw = false;
  std::string message;
  double loss = 0;
  std::vector<double> grad, losses;
};

// Runs a case with the given placements (args, then grad, then losses).
run_result run(arena& mem, const loss_case& c, const std::vector<placement>& args, placement grad, placement losses) {
  mem.clear();
  std::vector<mutable_array_view> arg_views;
  for (std::size_t i = 0; i < c.args.size(); ++i) arg_views.push_back(mem.place(c.args[i].type, c.args[i].shape, args[i]));
  const mutable_array_view g = mem.place(dtype::float64, c.args[0].shape, grad);
  const mutable_array_view l = mem.place(dtype::float64, c.losses_shape, losses);
  for (std::size_t i = 0; i < c.args.size(); ++i) mem.write(arg_views[i], c.args[i].values);
  std::vector<array_view> in(arg_views.begin(), arg_views.end());
  outputs out;
  out.grad = g;
  out.losses = l;
  run_result r;
  try {
    r.loss = c.call(in, out);
    r.grad = mem.read(g);
    r.losses = mem.read(l);
  } catch (const softce::error& e) {
    r.threw = true;
    r.message = e.what();
  }
  return r;
}

enum class mode { exact, one_element, interleaved, apart };
const char* mode_name(mode m) {
  switch (m) {
    case mode::exact: return "exact";
    case mode::one_element: return "one element";
    case mode::interleaved: return "interleaved";
    case mode::apart: return "apart";
  }
  return "?";
}

// The output's and the other array's placements for a mode: `other_slots` is the other
// array's element count; both arrays are in the other's block.
std::pair<placement, placement> place_pair(mode m, std::int64_t other_slots, std::size_t other_block) {
  const std::int64_t base = static_cast<std::int64_t>(other_block) * kBlock;
  switch (m) {
    case mode::exact: return {{base, 1}, {base, 1}};
    case mode::one_element: return {{base + other_slots - 1, 1}, {base, 1}};  // the output starts on its last element
    case mode::interleaved: return {{base + 1, 2}, {base, 2}};
    case mode::apart: break;
  }
  return {{15 * kBlock, 1}, {base, 1}};
}

void expect_same_numbers(const run_result& a, const run_result& b) {
  EXPECT_EQ(a.loss, b.loss);
  EXPECT_EQ(a.grad, b.grad);
  EXPECT_EQ(a.losses, b.losses);
}

// Each output against the arrays [first, last) of args (0: the logits).
void hunt_outputs_against_inputs(std::size_t first, std::size_t last) {
  arena mem;
  for (const loss_case& c : every_loss()) {
    std::vector<placement> args;
    for (std::size_t i = 0; i < c.args.size(); ++i) args.push_back(default_place(i));
    const run_result reference = run(mem, c, args, default_place(kGrad), default_place(kLosses));
    ASSERT_FALSE(reference.threw) << c.fn << ": " << reference.message;
    for (std::size_t a = first; a < std::min(last, c.args.size()); ++a) {
      for (const char* output : {"grad", "losses"}) {
        const bool is_grad = std::string(output) == "grad";
        for (mode m : {mode::exact, mode::one_element, mode::interleaved, mode::apart}) {
          SCOPED_TRACE(c.fn + " " + output + " vs " + c.args[a].name + " (" + mode_name(m) + ")");
          const auto [out_place, arg_place] = place_pair(m, slots_of(c.args[a].shape), a);
          std::vector<placement> p = args;
          p[a] = arg_place;
          const run_result r = is_grad ? run(mem, c, p, out_place, default_place(kLosses))
                                       : run(mem, c, p, default_place(kGrad), out_place);
          const bool in_place = is_grad && a == 0 && m == mode::exact;
          if (m == mode::interleaved || m == mode::apart) {
            ASSERT_FALSE(r.threw) << r.message;
            expect_same_numbers(r, reference);
          } else if (in_place) {
            ASSERT_FALSE(r.threw) << r.message;
            EXPECT_EQ(r.loss, reference.loss);
          } else {
            EXPECT_TRUE(r.threw);
            EXPECT_EQ(r.message, c.fn + ": " + output + " overlaps " + c.args[a].name + kRule);
          }
        }
      }
    }
  }
}

TEST(Aliasing, EveryOutputAgainstTheInput) { hunt_outputs_against_inputs(0, 1); }

// (: needs the entry points to call detail::check_aliasing; enabled with that patch)
TEST(Aliasing, EveryOutputAgainstEveryOtherInput) { hunt_outputs_against_inputs(1, 99); }

TEST(Aliasing, OutputsAgainstEachOther) {
  arena mem;
  for (const loss_case& c : every_loss()) {
    std::vector<placement> args;
    for (std::size_t i = 0; i < c.args.size(); ++i) args.push_back(default_place(i));
    const run_result reference = run(mem, c, args, default_place(kGrad), default_place(kLosses));
    for (mode m : {mode::exact, mode::one_element, mode::interleaved, mode::apart}) {
      SCOPED_TRACE(c.fn + " losses vs grad (" + mode_name(m) + ")");
      const auto [losses_place, grad_place] = place_pair(m, slots_of(c.args[0].shape), kGrad);
      const run_result r = run(mem, c, args, grad_place, losses_place);
      if (m == mode::interleaved || m == mode::apart) {
        ASSERT_FALSE(r.threw) << r.message;
        expect_same_numbers(r, reference);
      } else {
        EXPECT_TRUE(r.threw);
        EXPECT_EQ(r.message, c.fn + ": losses overlaps grad" + kRule);
      }
    }
  }
}

// An output written twice through a zero or colliding stride.
TEST(Aliasing, OutputsThatOverlapThemselves) {
  std::vector<double> x(N * C, 0.5), t = probability_values(N, C), g(64), l(64);
  const array_view xv = softce::view(x.data(), {N, C}), tv = softce::view(t.data(), {N, C});
  softce::cross_entropy_options none;
  none.reduce = reduction::none;
  outputs out;
  out.grad = softce::view(g.data(), {N, C}, {0, 1});
  EXPECT_THROW_MESSAGE(softce::cross_entropy(xv, tv, none, out),
                       "cross_entropy: grad: expected every element at its own address, got strides (0, 1) for shape (3, 5)");
  out.grad = softce::view(g.data(), {N, C}, {4, 1});  // row r's last class is row r + 1's first
  EXPECT_THROW_MESSAGE(softce::cross_entropy(xv, tv, none, out),
                       "cross_entropy: grad: expected every element at its own address, got strides (4, 1) for shape (3, 5)");
  out.grad = softce::view(g.data(), {N, C}, {3, 2});  // 0 2 4 6 8 / 3 5 7 ...: rows collide
  EXPECT_THROW_MESSAGE(softce::cross_entropy(xv, tv, none, out),
                       "cross_entropy: grad: expected every element at its own address, got strides (3, 2) for shape (3, 5)");
  out.grad = softce::view(g.data(), {N, C}, {1, 3});  // column-major with padding: apart
  EXPECT_NO_THROW(softce::cross_entropy(xv, tv, none, out));
  out.grad.reset();
  out.losses = softce::view(l.data(), {N}, {0});
  EXPECT_THROW_MESSAGE(softce::cross_entropy(xv, tv, none, out),
                       "cross_entropy: losses: expected every element at its own address, got strides (0) for shape (3)");
  softce::kl_div_options kl;
  kl.reduce = reduction::none;
  out.losses = softce::view(l.data(), {N, C}, {2, 1});
  EXPECT_THROW_MESSAGE(softce::kl_div(xv, tv, kl, out),
                       "kl_div: losses: expected every element at its own address, got strides (2, 1) for shape (3, 5)");
  // a zero stride over a dimension of size 1 addresses one element: fine
  out.losses = softce::view(l.data(), {1, C}, {0, 1});
  EXPECT_NO_THROW(softce::kl_div(softce::view(x.data(), {1, C}), softce::view(t.data(), {1, C}), kl, out));
}

// The examples found in issue 9, all accepted before and computed wrongly.
TEST(Aliasing, ExamplesFromTheIssue) {
  std::vector<double> big(2 * N * C), g(N * C);
  for (std::size_t i = 0; i < big.size(); ++i) big[i] = 0.01 * static_cast<double>(i);
  std::vector<double> t = probability_values(N, C);
  const array_view tv = softce::view(t.data(), {N, C});
  outputs out;
  // grad that overlaps the input by one element
  out.grad = softce::view(big.data() + N * C - 1, {N, C});
  EXPECT_THROW_MESSAGE(softce::cross_entropy(softce::view(big.data(), {N, C}), tv, {}, out),
                       "cross_entropy: grad overlaps input" + kRule);
  // inputs that are only read may overlap
  const array_view input = softce::view(big.data(), {N * C}), target = softce::view(big.data() + 1, {N * C});
  EXPECT_NO_THROW(softce::cross_entropy(input, target));
  EXPECT_NO_THROW(softce::cross_entropy(input, input));
  softce::distillation_options d;
  EXPECT_NO_THROW(softce::distillation_loss(input, target, d));
  out.grad = softce::view(g.data(), {N * C});
  EXPECT_NO_THROW(softce::distillation_loss(input, target, d, out));
}

// (: needs the entry points to call detail::check_aliasing; enabled with that patch)
TEST(Aliasing, ExamplesFromTheIssueWithOtherInputs) {
  std::vector<double> big(2 * N * C), g(N * C);
  for (std::size_t i = 0; i < big.size(); ++i) big[i] = 0.01 * static_cast<double>(i);
  std::vector<double> t = probability_values(N, C);
  const array_view tv = softce::view(t.data(), {N, C});
  outputs out;
  // grad that aliases the target
  out.grad = softce::view(t.data(), {N, C});
  EXPECT_THROW_MESSAGE(softce::cross_entropy(softce::view(g.data(), {N, C}), tv, {}, out),
                       "cross_entropy: grad overlaps target" + kRule);
  // input big[:-1] and target big[1:] overlapping, gradient in place over the input
  const array_view input = softce::view(big.data(), {N * C}), target = softce::view(big.data() + 1, {N * C});
  out.grad = softce::view(big.data(), {N * C});
  EXPECT_THROW_MESSAGE(softce::cross_entropy(input, target, {}, out), "cross_entropy: grad overlaps target" + kRule);
  // cross_entropy(x, x) with the gradient in place
  EXPECT_THROW_MESSAGE(softce::cross_entropy(input, input, {}, out), "cross_entropy: grad overlaps target" + kRule);
  // distillation with the teacher overlapping the student, gradient in place
  softce::distillation_options d;
  EXPECT_THROW_MESSAGE(softce::distillation_loss(input, target, d, out), "distillation_loss: grad overlaps teacher" + kRule);
}

// ---------------------------------------------------------------------------------------
// the overlap test itself

using softce::detail::overlap;
using softce::detail::overlap_of;
using softce::detail::overlaps_itself;

array_view strided(const double* base, shape_t shape, shape_t strides) {
  array_view v;
  v.data = base;
  v.type = dtype::float64;
  v.ndim = static_cast<int>(shape.size());
  for (int d = 0; d < v.ndim; ++d) v.shape[d] = shape[d], v.strides[d] = strides[d];
  return v;
}

TEST(Aliasing, OverlapOfTwoViews) {
  std::vector<double> m(8 * 6);
  const double* x = m.data();
  // interleaved columns x[:, ::2] and x[:, 1::2]
  EXPECT_EQ(overlap_of(strided(x, {8, 3}, {6, 2}), strided(x + 1, {8, 3}, {6, 2})), overlap::none);
  EXPECT_EQ(overlap_of(strided(x, {8, 3}, {6, 2}), strided(x + 2, {8, 3}, {6, 2})), overlap::partial);
  // two different columns, and a column against the rest of the matrix
  EXPECT_EQ(overlap_of(strided(x, {8}, {6}), strided(x + 5, {8}, {6})), overlap::none);
  EXPECT_EQ(overlap_of(strided(x, {8}, {6}), strided(x + 1, {8, 5}, {6, 1})), overlap::none);
  EXPECT_EQ(overlap_of(strided(x + 3, {8}, {6}), strided(x + 1, {8, 5}, {6, 1})), overlap::partial);
  // two different rows (byte ranges apart) and the same row
  EXPECT_EQ(overlap_of(strided(x, {6}, {1}), strided(x + 6, {6}, {1})), overlap::none);
  EXPECT_EQ(overlap_of(strided(x, {6}, {1}), strided(x, {6}, {1})), overlap::same);
  // the same elements in another order is not the same view
  EXPECT_EQ(overlap_of(strided(x, {6}, {1}), strided(x + 5, {6}, {-1})), overlap::partial);
  // a transposed view of the same memory
  EXPECT_EQ(overlap_of(strided(x, {8, 6}, {6, 1}), strided(x, {6, 8}, {1, 6})), overlap::partial);
  // size-1 dimensions' strides do not matter for sameness
  EXPECT_EQ(overlap_of(strided(x, {1, 6}, {99, 1}), strided(x, {1, 6}, {6, 1})), overlap::same);
  // a different dtype over the same bytes
  array_view f = strided(x, {6}, {1});
  f.type = dtype::float32;
  f.strides[0] = 2;
  EXPECT_EQ(overlap_of(f, strided(x, {6}, {1})), overlap::partial);
  f.data = reinterpret_cast<const char*>(x) + 4;  // the upper halves of x's doubles
  EXPECT_EQ(overlap_of(f, strided(x, {6}, {1})), overlap::partial);
  f.data = reinterpret_cast<const char*>(x + 1) + 4;
  f.strides[0] = 4;  // every other double's upper half, against the even doubles
  EXPECT_EQ(overlap_of(f, strided(x, {3}, {2})), overlap::none);
  EXPECT_EQ(overlap_of(strided(x, {3}, {2}), f), overlap::none);
  EXPECT_EQ(overlap_of(f, strided(x + 1, {3}, {2})), overlap::partial);
  EXPECT_EQ(overlap_of(strided(x + 1, {3}, {2}), f), overlap::partial);
  f.data = reinterpret_cast<const char*>(x + 1) - 4;  // the upper halves of the even doubles
  EXPECT_EQ(overlap_of(f, strided(x + 1, {3}, {2})), overlap::none);
  EXPECT_EQ(overlap_of(strided(x + 1, {3}, {2}), f), overlap::none);
  EXPECT_EQ(overlap_of(f, strided(x, {3}, {2})), overlap::partial);
  EXPECT_EQ(overlap_of(strided(x, {3}, {2}), f), overlap::partial);
  // empty views overlap nothing
  EXPECT_EQ(overlap_of(strided(x, {0, 6}, {6, 1}), strided(x, {8, 6}, {6, 1})), overlap::none);
}

TEST(Aliasing, OverlapsItself) {
  std::vector<double> m(64);
  const double* x = m.data();
  EXPECT_FALSE(overlaps_itself(strided(x, {4, 5}, {5, 1})));
  EXPECT_FALSE(overlaps_itself(strided(x, {4, 5}, {1, 4})));
  EXPECT_FALSE(overlaps_itself(strided(x, {4, 5}, {-5, -1})));
  EXPECT_FALSE(overlaps_itself(strided(x, {1, 5}, {0, 1})));
  EXPECT_TRUE(overlaps_itself(strided(x, {4, 5}, {0, 1})));
  EXPECT_TRUE(overlaps_itself(strided(x, {4, 5}, {1, 1})));
  EXPECT_TRUE(overlaps_itself(strided(x, {4, 5}, {4, 1})));
  // strides (3, 2) over (3, 3): offsets 0 2 4 / 3 5 7 / 6 8 10 are distinct, yet not nested
  EXPECT_FALSE(overlaps_itself(strided(x, {3, 3}, {3, 2})));
  // strides (2, 3) over (3, 3): 0 3 6 / 2 5 8 / 4 7 10: distinct
  EXPECT_FALSE(overlaps_itself(strided(x, {3, 3}, {2, 3})));
  // strides (2, 3) over (4, 3): 6 = 2 * 3 = 3 * 2 collides
  EXPECT_TRUE(overlaps_itself(strided(x, {4, 3}, {2, 3})));
}

}  // namespace
}  // namespace softce_test
