// Memory layouts: every function on padded, permuted (column-major), negative-stride,
// interleaved and (N, C, d) inputs, gradients written with their own strides and in place,
// broadcast (zero-stride) operands, the view factories, and output rounding.
#include "test_support.hpp"

#include <deque>

namespace softce_test {
namespace {

using softce::divergence;
using softce::reduction;
namespace ref = softce::reference;

struct named_call {
  std::string name;
  loss_call fast, reference;
};

// Every loss, with targets for logits of `shape` (operands in random layouts), kept alive
// in `keep`.
std::vector<named_call> every_function(std::mt19937_64& rng, const shape_t& shape, dtype type, std::deque<tensor>& keep) {
  const std::int64_t C = classes_of(shape);
  const shape_t rs = row_shape_of(shape);
  const std::int64_t rows = product(rs);
  const int ndim = static_cast<int>(shape.size());
  auto add = [&](tensor t) -> const tensor& { return keep.emplace_back(std::move(t)); };
  const tensor& t = add(make_tensor(shape, type, probability_targets(rng, shape), random_layout(rng, ndim)));
  const tensor& z = add(make_tensor(shape, type, normal_values(rng, product(shape), 2.0), random_layout(rng, ndim)));
  const tensor& bits = add(make_tensor(shape, type, uniform_values(rng, product(shape), 0.0, 1.0), random_layout(rng, ndim)));
  std::vector<std::int64_t> y(static_cast<std::size_t>(rows)), m(static_cast<std::size_t>(rows));
  for (auto& v : y) v = rng() % 5 == 0 ? -100 : static_cast<std::int64_t>(rng() % C);
  for (auto& v : m) v = rng() % 4 != 0;
  const tensor& labels = add(make_index_tensor(rs, dtype::int64, y, random_layout(rng, static_cast<int>(rs.size()))));
  const tensor& mask = add(make_index_tensor(rs, dtype::boolean, m, random_layout(rng, static_cast<int>(rs.size()))));
  const tensor& w = add(make_tensor({C}, type, uniform_values(rng, C, 0.5, 1.5), random_layout(rng, 1)));
  const std::int64_t K = std::min<std::int64_t>(C, 4);
  const topk_data d = random_topk(rng, shape, K, false);
  const tensor& idx = add(make_index_tensor(d.shape, dtype::int32, d.indices, random_layout(rng, static_cast<int>(d.shape.size()))));
  const tensor& val = add(make_tensor(d.shape, type, d.values, random_layout(rng, static_cast<int>(d.shape.size()))));
  const tensor& pw = add(make_tensor({shape.back()}, type, uniform_values(rng, shape.back(), 0.5, 2.0)));

  softce::cross_entropy_options index_options;
  index_options.weight = w.view();
  index_options.label_smoothing = 0.1;
  softce::cross_entropy_options prob_options;
  prob_options.mask = mask.view();
  prob_options.reduce = reduction::sum;
  const softce::topk k{idx.view(), val.view(), false};
  const softce::topk k_tail{idx.view(), val.view(), true};
  softce::kl_div_options kl;
  kl.reduce = reduction::batchmean;
  softce::bce_options bce;
  bce.pos_weight = pw.view();
  const array_view tv = t.view(), zv = z.view(), yv = labels.view(), bv = bits.view();

  std::vector<named_call> calls;
  calls.push_back({"cross_entropy index",
                   [=](const array_view& in, const softce::outputs& o) { return softce::cross_entropy(in, yv, index_options, o); },
                   [=](const array_view& in, const softce::outputs& o) { return ref::cross_entropy(in, yv, index_options, o); }});
  calls.push_back({"cross_entropy probabilities",
                   [=](const array_view& in, const softce::outputs& o) { return softce::cross_entropy(in, tv, prob_options, o); },
                   [=](const array_view& in, const softce::outputs& o) { return ref::cross_entropy(in, tv, prob_options, o); }});
  calls.push_back({"cross_entropy top-k",
                   [=](const array_view& in, const softce::outputs& o) { return softce::cross_entropy(in, k, prob_options, o); },
                   [=](const array_view& in, const softce::outputs& o) { return ref::cross_entropy(in, k, prob_options, o); }});
  calls.push_back({"cross_entropy top-k tail",
                   [=](const array_view& in, const softce::outputs& o) { return softce::cross_entropy(in, k_tail, prob_options, o); },
                   [=](const array_view& in, const softce::outputs& o) { return ref::cross_entropy(in, k_tail, prob_options, o); }});
  calls.push_back({"cross_entropy_with_probs",
                   [=](const array_view& in, const softce::outputs& o) {
                     return softce::cross_entropy_with_probs(in, tv, index_options.weight, reduction::mean, o);
                   },
                   [=](const array_view& in, const softce::outputs& o) {
                     return ref::cross_entropy_with_probs(in, tv, index_options.weight, reduction::mean, o);
                   }});
  // kl_div: the input is log-probabilities; the target a probability array
  calls.push_back({"kl_div", [=](const array_view& in, const softce::outputs& o) { return softce::kl_div(in, tv, kl, o); },
                   [=](const array_view& in, const softce::outputs& o) { return ref::kl_div(in, tv, kl, o); }});
  calls.push_back({"binary_cross_entropy_with_logits",
                   [=](const array_view& in, const softce::outputs& o) { return softce::binary_cross_entropy_with_logits(in, bv, bce, o); },
                   [=](const array_view& in, const softce::outputs& o) { return ref::binary_cross_entropy_with_logits(in, bv, bce, o); }});
  for (divergence kind : {divergence::kl, divergence::reverse_kl, divergence::jsd}) {
    softce::distillation_options dop;
    dop.kind = kind;
    dop.temperature = 1.5;
    dop.mask = mask.view();
    dop.dim = 1;  // PyTorch's (N, C, d1, ...) layout
    calls.push_back({std::string("distillation ") + divergence_text(kind),
                     [=](const array_view& in, const softce::outputs& o) { return softce::distillation_loss(in, zv, dop, o); },
                     [=](const array_view& in, const softce::outputs& o) { return ref::distillation_loss(in, zv, dop, o); }});
  }
  softce::distillation_options dk;
  dk.temperature = 2;
  dk.dim = 1;
  calls.push_back({"distillation top-k",
                   [=](const array_view& in, const softce::outputs& o) { return softce::distillation_loss(in, k, dk, o); },
                   [=](const array_view& in, const softce::outputs& o) { return ref::distillation_loss(in, k, dk, o); }});
  return calls;
}

// Named layouts of a 2-d (N, C) input.
std::vector<std::pair<std::string, layout>> named_layouts_2d() {
  std::vector<std::pair<std::string, layout>> out;
  layout l = row_major(2);
  out.push_back({"contiguous", l});
  l.gap = {0, 3};
  out.push_back({"row stride > C", l});
  l = row_major(2);
  l.order = {1, 0};
  out.push_back({"column-major (class stride N)", l});
  l = row_major(2);
  l.flip = {false, true};
  out.push_back({"negative class stride", l});
  l = row_major(2);
  l.flip = {true, false};
  out.push_back({"negative row stride", l});
  l = row_major(2);
  l.spacing = 2;
  out.push_back({"interleaved (class stride 2)", l});
  l = row_major(2);
  l.order = {1, 0};
  l.gap = {2, 1};
  l.flip = {true, true};
  l.spacing = 3;
  out.push_back({"everything", l});
  return out;
}

// (B, V, S) values back to (B, S, V) order.
std::vector<double> transposed_back(const std::vector<double>& t, std::int64_t B, std::int64_t S, std::int64_t V) {
  std::vector<double> a(t.size());
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t s = 0; s < S; ++s)
      for (std::int64_t v = 0; v < V; ++v) a[static_cast<std::size_t>((b * S + s) * V + v)] = t[static_cast<std::size_t>((b * V + v) * S + s)];
  return a;
}

TEST(Layout, EveryFunctionOnEveryLayout) {
  std::mt19937_64 rng(1001);
  for (dtype type : {dtype::float32, dtype::float64, dtype::float16}) {
    const shape_t shape{5, 37};
    std::deque<tensor> keep;
    const std::vector<named_call> calls = every_function(rng, shape, type, keep);
    for (const auto& [layout_name, lay] : named_layouts_2d()) {
      const tensor input = make_tensor(shape, type, normal_values(rng, product(shape), 2.0), lay);
      for (const named_call& call : calls) {
        SCOPED_TRACE(call.name + " on " + layout_name + " " + input.describe());
        output_request req;
        req.grad = true;
        req.grad_type = type;
        req.grad_layout = random_layout(rng, 2);
        expect_matches_reference(call.fast, call.reference, input, req, compute_rtol(type) * 4);
        req.in_place = true;
        expect_matches_reference(call.fast, call.reference, input, req, compute_rtol(type) * 4);
      }
    }
  }
}

TEST(Layout, ClassDimensionInTheMiddle) {
  // (N, C, d1, d2): classes at stride d1 * d2, rows (n, d1, d2); also permuted.
  std::mt19937_64 rng(1002);
  for (dtype type : {dtype::float32, dtype::bfloat16}) {
    const shape_t shape{3, 21, 4, 2};
    std::deque<tensor> keep;
    const std::vector<named_call> calls = every_function(rng, shape, type, keep);
    for (int trial = 0; trial < 3; ++trial) {
      const tensor input = make_tensor(shape, type, normal_values(rng, product(shape), 2.0), trial == 0 ? layout{} : random_layout(rng, 4));
      for (const named_call& call : calls) {
        SCOPED_TRACE(call.name + " on " + input.describe());
        output_request req;
        req.grad = true;
        req.grad_type = dtype::float32;
        req.grad_layout = random_layout(rng, 4);
        expect_matches_reference(call.fast, call.reference, input, req, compute_rtol(type) * 4);
      }
    }
  }
}

// In place (grad = input) gives exactly the gradient written elsewhere in the same dtype.
TEST(Layout, InPlaceGradientIsBitwiseTheOutOfPlaceOne) {
  std::mt19937_64 rng(1003);
  for (dtype type : {dtype::float32, dtype::float64, dtype::bfloat16}) {
    for (const shape_t& shape : {shape_t{6, 300}, shape_t{2, 5000}, shape_t{3, 40, 2}}) {
      std::deque<tensor> keep;
      const std::vector<named_call> calls = every_function(rng, shape, type, keep);
      for (const layout& lay : {row_major(static_cast<int>(shape.size())), random_layout(rng, static_cast<int>(shape.size()))}) {
        const tensor input = make_tensor(shape, type, normal_values(rng, product(shape), 2.0), lay);
        for (const named_call& call : calls) {
          SCOPED_TRACE(call.name + " on " + input.describe());
          output_request out_of_place;
          out_of_place.grad = true;
          out_of_place.grad_type = type;
          out_of_place.grad_layout = lay;
          output_request in_place = out_of_place;
          in_place.in_place = true;
          const call_result a = run_call(call.fast, input, out_of_place);
          const call_result b = run_call(call.fast, input, in_place);
          EXPECT_EQ(std::memcmp(&a.loss, &b.loss, sizeof(double)), 0) << a.loss << " vs " << b.loss;
          EXPECT_TRUE(a.grad_bytes == b.grad_bytes) << values_near(b.grad, a.grad, {0, 0, 0}, "in-place grad").message();
        }
      }
    }
  }
}

// distillation_loss's dim: language-model logits (B, S, V) with dim = -1 give what the same
// numbers give transposed to (B, V, S) with dim = 1, and flattened to (B * S, V); per-row
// arrays (mask, losses, top-k) keep the (B, S) row shape. (: needs the entry points
// to call detail::distillation_layout; enabled with that patch)
TEST(Layout, DistillationClassDimension) {
  std::mt19937_64 rng(1006);
  constexpr std::int64_t B = 2, S = 3, V = 7, K = 3;
  const std::vector<double> x = normal_values(rng, B * S * V, 2.0), z = normal_values(rng, B * S * V, 2.0);
  auto transposed = [&](const std::vector<double>& a) {  // (B, S, V) -> (B, V, S)
    std::vector<double> t(a.size());
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t s = 0; s < S; ++s)
        for (std::int64_t v = 0; v < V; ++v) t[static_cast<std::size_t>((b * V + v) * S + s)] = a[static_cast<std::size_t>((b * S + s) * V + v)];
    return t;
  };
  const std::vector<double> xt = transposed(x), zt = transposed(z);
  const bool mask_values[B * S] = {true, false, true, true, true, false};
  // a top-k teacher (B, S, K)
  std::vector<std::int64_t> idx(B * S * K);
  std::vector<double> val(B * S * K);
  for (std::int64_t r = 0; r < B * S; ++r)
    for (std::int64_t j = 0; j < K; ++j) {
      idx[static_cast<std::size_t>(r * K + j)] = (r + 2 * j) % V;
      val[static_cast<std::size_t>(r * K + j)] = 0.2 + 0.1 * static_cast<double>(j);
    }
  struct result {
    double loss;
    std::vector<double> grad, losses;
  };
  for (int teacher_kind = 0; teacher_kind < 4; ++teacher_kind) {
    softce::distillation_options o;
    o.kind = teacher_kind == 1 ? divergence::reverse_kl : teacher_kind == 2 ? divergence::jsd : divergence::kl;
    o.temperature = 1.5;
    const bool topk_teacher = teacher_kind == 3;
    SCOPED_TRACE(topk_teacher ? std::string("top-k teacher") : std::string(divergence_text(o.kind)));
    for (bool masked : {false, true}) {
      for (reduction r : {reduction::none, reduction::batchmean}) {
        o.reduce = r;
        // layout 0: (B, S, V), dim -1; 1: (B, V, S), dim 1; 2: (B * S, V), no dim
        std::vector<result> results;
        for (int form = 0; form < 3; ++form) {
          const shape_t shape = form == 0 ? shape_t{B, S, V} : form == 1 ? shape_t{B, V, S} : shape_t{B * S, V};
          const shape_t rows = form == 2 ? shape_t{B * S} : shape_t{B, S};
          const std::vector<double>& xs = form == 1 ? xt : x;
          const std::vector<double>& zs = form == 1 ? zt : z;
          softce::distillation_options of = o;
          if (form == 0) of.dim = -1;
          if (form == 1) of.dim = 1;
          array_view mask_view;
          mask_view.data = mask_values;
          mask_view.type = dtype::boolean;
          mask_view.ndim = static_cast<int>(rows.size());
          for (int d = 0; d < mask_view.ndim; ++d) mask_view.shape[d] = rows[static_cast<std::size_t>(d)];
          mask_view.strides[mask_view.ndim - 1] = 1;
          if (mask_view.ndim == 2) mask_view.strides[0] = S;
          if (masked) of.mask = mask_view;
          std::vector<double> g(xs.size(), 0.0), l(B * S, 0.0);
          array_view in, teacher_logits;
          mutable_array_view gv, lv;
          if (form == 2) {
            in = softce::view(xs.data(), {B * S, V});
            teacher_logits = softce::view(zs.data(), {B * S, V});
            gv = softce::view(g.data(), {B * S, V});
            lv = softce::view(l.data(), {B * S});
          } else {
            in = softce::view(xs.data(), {shape[0], shape[1], shape[2]});
            teacher_logits = softce::view(zs.data(), {shape[0], shape[1], shape[2]});
            gv = softce::view(g.data(), {shape[0], shape[1], shape[2]});
            lv = softce::view(l.data(), {B, S});
          }
          softce::outputs out;
          out.grad = gv;
          if (r == reduction::none) out.losses = lv;
          double loss;
          if (topk_teacher) {
            const array_view iv = form == 2 ? softce::view(idx.data(), {B * S, K}) : softce::view(idx.data(), {B, S, K});
            const array_view vv = form == 2 ? softce::view(val.data(), {B * S, K}) : softce::view(val.data(), {B, S, K});
            loss = softce::distillation_loss(in, softce::topk{iv, vv, true}, of, out);
          } else {
            loss = softce::distillation_loss(in, teacher_logits, of, out);
          }
          results.push_back({loss, form == 1 ? transposed_back(g, B, S, V) : g, l});
        }
        for (int form = 1; form < 3; ++form) {
          SCOPED_TRACE("form " + std::to_string(form) + (masked ? " masked " : " ") + reduction_text(r));
          EXPECT_TRUE(loss_near(results[static_cast<std::size_t>(form)].loss, results[0].loss, loss_tolerance(dtype::float64)));
          EXPECT_TRUE(values_near(results[static_cast<std::size_t>(form)].grad, results[0].grad, array_tolerance(dtype::float64, dtype::float64), "grad"));
          EXPECT_TRUE(values_near(results[static_cast<std::size_t>(form)].losses, results[0].losses, array_tolerance(dtype::float64, dtype::float64), "losses"));
        }
        // and the class dimension taken at 1 (the sequence) would differ
        if (!topk_teacher) {
          softce::distillation_options wrong = o;
          wrong.dim = 1;
          wrong.mask.reset();
          softce::distillation_options right = o;
          right.dim = -1;
          right.mask.reset();
          const array_view in = softce::view(x.data(), {B, S, V}), teacher_logits = softce::view(z.data(), {B, S, V});
          if (r != reduction::none) {
            EXPECT_NE(softce::distillation_loss(in, teacher_logits, wrong), softce::distillation_loss(in, teacher_logits, right));
          }
        }
      }
    }
  }
}

// dim = 0 of a 2-d (C, N) input: the columns are the rows. (: as above)
TEST(Layout, DistillationClassDimensionZero) {
  std::mt19937_64 rng(1007);
  constexpr std::int64_t R = 4, V = 9;
  const std::vector<double> x = normal_values(rng, R * V, 2.0), z = normal_values(rng, R * V, 2.0);
  std::vector<double> xt(R * V), zt(R * V);  // (V, R)
  for (std::int64_t r = 0; r < R; ++r)
    for (std::int64_t v = 0; v < V; ++v) {
      xt[static_cast<std::size_t>(v * R + r)] = x[static_cast<std::size_t>(r * V + v)];
      zt[static_cast<std::size_t>(v * R + r)] = z[static_cast<std::size_t>(r * V + v)];
    }
  for (divergence kind : {divergence::kl, divergence::reverse_kl, divergence::jsd}) {
    softce::distillation_options o;
    o.kind = kind;
    o.reduce = reduction::none;
    std::vector<double> g(R * V), gt(R * V), l(R), lt(R);
    softce::outputs out, out_t;
    out.grad = softce::view(g.data(), {R, V});
    out.losses = softce::view(l.data(), {R});
    out_t.grad = softce::view(gt.data(), {V, R});
    out_t.losses = softce::view(lt.data(), {R});
    const double a = softce::distillation_loss(softce::view(x.data(), {R, V}), softce::view(z.data(), {R, V}), o, out);
    o.dim = 0;
    const double b = softce::distillation_loss(softce::view(xt.data(), {V, R}), softce::view(zt.data(), {V, R}), o, out_t);
    EXPECT_TRUE(loss_near(b, a, loss_tolerance(dtype::float64)));
    EXPECT_TRUE(values_near(lt, l, array_tolerance(dtype::float64, dtype::float64), "losses"));
    std::vector<double> gback(R * V);
    for (std::int64_t r = 0; r < R; ++r)
      for (std::int64_t v = 0; v < V; ++v) gback[static_cast<std::size_t>(r * V + v)] = gt[static_cast<std::size_t>(v * R + r)];
    EXPECT_TRUE(values_near(gback, g, array_tolerance(dtype::float64, dtype::float64), "grad"));
  }
}

// Zero strides: one target row, weight or mask shared by every row.
TEST(Layout, BroadcastOperands) {
  std::mt19937_64 rng(1004);
  const std::int64_t N = 6, C = 11;
  const shape_t shape{N, C};
  const tensor x = make_tensor(shape, dtype::float32, normal_values(rng, N * C, 2.0));
  const std::vector<double> row = probability_targets(rng, {C});
  std::vector<float> row32(row.begin(), row.end());
  array_view t;  // (N, C) with row stride 0
  t.data = row32.data();
  t.type = dtype::float32;
  t.ndim = 2;
  t.shape[0] = N, t.shape[1] = C;
  t.strides[0] = 0, t.strides[1] = 1;
  float one_weight = 0.7f;
  array_view w;  // (C,) with stride 0
  w.data = &one_weight;
  w.type = dtype::float32;
  w.ndim = 1;
  w.shape[0] = C;
  w.strides[0] = 0;
  bool keep_row = true;
  array_view mask;
  mask.data = &keep_row;
  mask.type = dtype::boolean;
  mask.ndim = 1;
  mask.shape[0] = N;
  mask.strides[0] = 0;
  softce::cross_entropy_options o;
  o.weight = w;
  o.mask = mask;
  o.label_smoothing = 0.05;
  output_request req;
  req.grad = true;
  expect_matches_reference([&](const array_view& in, const softce::outputs& out) { return softce::cross_entropy(in, t, o, out); },
                           [&](const array_view& in, const softce::outputs& out) { return ref::cross_entropy(in, t, o, out); }, x, req);
  // the same top-k for every row
  std::int64_t ids[3] = {4, 0, 9};
  float vals[3] = {0.5f, 0.2f, 0.1f};
  array_view ki, kv;
  ki.data = ids, ki.type = dtype::int64, kv.data = vals, kv.type = dtype::float32;
  ki.ndim = kv.ndim = 2;
  ki.shape[0] = kv.shape[0] = N;
  ki.shape[1] = kv.shape[1] = 3;
  ki.strides[0] = kv.strides[0] = 0;
  ki.strides[1] = kv.strides[1] = 1;
  const softce::topk k{ki, kv, false};
  expect_matches_reference([&](const array_view& in, const softce::outputs& out) { return softce::cross_entropy(in, k, {}, out); },
                           [&](const array_view& in, const softce::outputs& out) { return ref::cross_entropy(in, k, {}, out); }, x, req);
  // bce with a (N, 1) weight given as (N, C) with class stride 0
  float row_weights[N] = {0.5f, 1, 1.5f, 2, 0.25f, 1};
  array_view bw;
  bw.data = row_weights, bw.type = dtype::float32, bw.ndim = 2;
  bw.shape[0] = N, bw.shape[1] = C, bw.strides[0] = 1, bw.strides[1] = 0;
  softce::bce_options b;
  b.weight = bw;
  const tensor bt = make_tensor(shape, dtype::float32, uniform_values(rng, N * C, 0.0, 1.0));
  expect_matches_reference(
      [&](const array_view& in, const softce::outputs& out) { return softce::binary_cross_entropy_with_logits(in, bt.view(), b, out); },
      [&](const array_view& in, const softce::outputs& out) { return ref::binary_cross_entropy_with_logits(in, bt.view(), b, out); }, x,
      req);
}

TEST(Layout, ViewFactories) {
  float data[24] = {};
  const float* cdata = data;
  const array_view a = softce::view(cdata, {2, 3, 4});
  EXPECT_EQ(a.ndim, 3);
  EXPECT_EQ(a.type, dtype::float32);
  EXPECT_EQ(a.strides[0], 12);
  EXPECT_EQ(a.strides[1], 4);
  EXPECT_EQ(a.strides[2], 1);
  EXPECT_EQ(a.numel(), 24);
  const mutable_array_view m = softce::view(data, {4, 3}, {1, 4});
  EXPECT_EQ(m.strides[0], 1);
  EXPECT_EQ(m.strides[1], 4);
  const array_view converted = m;
  EXPECT_EQ(converted.data, static_cast<const void*>(data));
  EXPECT_EQ(converted.shape[1], 3);
  const array_view empty = softce::view(cdata, {0, 5});
  EXPECT_EQ(empty.numel(), 0);
  EXPECT_EQ(empty.strides[0], 5);
  const std::int64_t labels[2] = {1, 2};
  EXPECT_EQ(softce::view(labels, {2}).type, dtype::int64);
  const softce::bfloat16 h[1] = {};
  EXPECT_EQ(softce::view(h, {1}).type, dtype::bfloat16);
  EXPECT_EQ(softce::dtype_size(dtype::float16), 2u);
  EXPECT_EQ(softce::dtype_name(dtype::boolean), "bool");
}

// Outputs are rounded to nearest-even into their dtype, directly from the computed value:
// a float64 gradient written as bfloat16 / float16 must not be rounded twice (via float32).
TEST(Layout, Float64ResultsAreRoundedOnceInto16BitOutputs) {
  // kl_div with reduction sum has grad = -t exactly: t just above a 16-bit tie, by less
  // than half a float32 ulp.
  const double t_bf16 = 1 + 0x1p-8 + 0x1p-30;  // nearest bfloat16: 1 + 2^-7
  const double t_f16 = 1 + 0x1p-11 + 0x1p-30;  // nearest float16: 1 + 2^-10
  const tensor x = make_tensor({2}, dtype::float64, {-1.0, -1.0});
  const tensor t = make_tensor({2}, dtype::float64, {t_bf16, t_f16});
  softce::kl_div_options o;
  o.reduce = reduction::sum;
  for (dtype out_type : {dtype::bfloat16, dtype::float16}) {
    tensor g({2}, out_type);
    softce::outputs out;
    out.grad = g.mutable_view();
    softce::kl_div(x.view(), t.view(), o, out);
    const double expected = out_type == dtype::bfloat16 ? -(1 + 0x1p-7) : -(1 + 0x1p-10);
    EXPECT_EQ(g.values()[out_type == dtype::bfloat16 ? 0 : 1], expected) << name_of(out_type);
  }
}

}  // namespace
}  // namespace softce_test
