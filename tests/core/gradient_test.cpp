// Finite-difference checks of the gradients, float64: for every loss and every option, the
// gradient written by the fast function and by the reference equal central differences of
// the returned loss (their own and the reference's) at a few random coordinates.
#include "test_support.hpp"

namespace softce_test {
namespace {

using softce::divergence;
using softce::reduction;
namespace ref = softce::reference;
using loss_of_tensor = std::function<double(const tensor&, const softce::outputs&)>;

const reduction row_reductions[] = {reduction::none, reduction::mean, reduction::sum};
const shape_t shapes[] = {{4, 7}, {2, 5, 3}};  // (N, C) and (N, C, d): classes at stride d

std::string describe(const shape_t& shape, reduction r) {
  return shape_text(shape) + " reduction " + reduction_text(r);
}

TEST(Gradient, CrossEntropyProbabilityTargets) {
  std::mt19937_64 rng(701);
  for (const shape_t& shape : shapes)
    for (reduction r : row_reductions)
      for (bool weighted : {false, true})
        for (double eps : {0.0, 0.2})
          for (bool masked : {false, true}) {
            SCOPED_TRACE(describe(shape, r) + (weighted ? " weight" : "") + " smoothing " + std::to_string(eps) +
                         (masked ? " mask" : ""));
            const std::int64_t C = classes_of(shape);
            const shape_t rs = row_shape_of(shape);
            const tensor t = make_tensor(shape, dtype::float64, probability_targets(rng, shape));
            const tensor w = make_tensor({C}, dtype::float64, uniform_values(rng, C, 0.2, 2.0));
            const tensor m = make_index_tensor(rs, dtype::boolean, std::vector<std::int64_t>(product(rs), 1));
            tensor mask = m;
            mask.set_integers([&] {
              std::vector<std::int64_t> v(static_cast<std::size_t>(product(rs)));
              for (auto& b : v) b = rng() % 3 != 0;
              return v;
            }());
            softce::cross_entropy_options o;
            o.reduce = r;
            o.label_smoothing = eps;
            if (weighted) o.weight = w.view();
            if (masked) o.mask = mask.view();
            expect_gradient_matches_finite_differences(
                [&](const tensor& x, const softce::outputs& out) { return softce::cross_entropy(x.view(), t.view(), o, out); },
                [&](const tensor& x, const softce::outputs& out) { return ref::cross_entropy(x.view(), t.view(), o, out); },
                shape, normal_values(rng, product(shape), 2.0), rng);
          }
}

TEST(Gradient, CrossEntropyIndexTargets) {
  std::mt19937_64 rng(702);
  for (const shape_t& shape : shapes)
    for (reduction r : row_reductions)
      for (bool weighted : {false, true})
        for (double eps : {0.0, 0.2})
          for (bool ignore : {false, true}) {
            SCOPED_TRACE(describe(shape, r) + (weighted ? " weight" : "") + " smoothing " + std::to_string(eps) +
                         (ignore ? " ignored rows" : ""));
            const std::int64_t C = classes_of(shape);
            const shape_t rs = row_shape_of(shape);
            std::vector<std::int64_t> y(static_cast<std::size_t>(product(rs)));
            for (auto& v : y) v = ignore && rng() % 3 == 0 ? -100 : static_cast<std::int64_t>(rng() % C);
            const tensor labels = make_index_tensor(rs, dtype::int64, y);
            const tensor w = make_tensor({C}, dtype::float64, uniform_values(rng, C, 0.2, 2.0));
            softce::cross_entropy_options o;
            o.reduce = r;
            o.label_smoothing = eps;
            if (weighted) o.weight = w.view();
            expect_gradient_matches_finite_differences(
                [&](const tensor& x, const softce::outputs& out) { return softce::cross_entropy(x.view(), labels.view(), o, out); },
                [&](const tensor& x, const softce::outputs& out) { return ref::cross_entropy(x.view(), labels.view(), o, out); },
                shape, normal_values(rng, product(shape), 2.0), rng);
          }
}

TEST(Gradient, CrossEntropyTopKTargets) {
  std::mt19937_64 rng(703);
  for (const shape_t& shape : shapes)
    for (reduction r : row_reductions)
      for (int variant = 0; variant < 4; ++variant)  // plain, tail, weight, smoothing
        for (bool masked : {false, true}) {
          const char* names[] = {"plain", "tail", "weight", "smoothing"};
          SCOPED_TRACE(describe(shape, r) + " " + names[variant] + (masked ? " mask" : ""));
          const std::int64_t C = classes_of(shape);
          const shape_t rs = row_shape_of(shape);
          const topk_data d = random_topk(rng, shape, 3, variant != 1);
          const tensor idx = make_index_tensor(d.shape, dtype::int32, d.indices);
          const tensor val = make_tensor(d.shape, dtype::float64, d.values);
          const tensor w = make_tensor({C}, dtype::float64, uniform_values(rng, C, 0.2, 2.0));
          std::vector<std::int64_t> m(static_cast<std::size_t>(product(rs)));
          for (auto& b : m) b = rng() % 3 != 0;
          const tensor mask = make_index_tensor(rs, dtype::boolean, m);
          softce::cross_entropy_options o;
          o.reduce = r;
          if (variant == 2) o.weight = w.view();
          if (variant == 3) o.label_smoothing = 0.15;
          if (masked) o.mask = mask.view();
          const softce::topk k{idx.view(), val.view(), variant == 1};
          expect_gradient_matches_finite_differences(
              [&](const tensor& x, const softce::outputs& out) { return softce::cross_entropy(x.view(), k, o, out); },
              [&](const tensor& x, const softce::outputs& out) { return ref::cross_entropy(x.view(), k, o, out); }, shape,
              normal_values(rng, product(shape), 2.0), rng);
        }
}

TEST(Gradient, CrossEntropyWithProbs) {
  std::mt19937_64 rng(704);
  for (reduction r : row_reductions)
    for (bool weighted : {false, true}) {
      SCOPED_TRACE(std::string(reduction_text(r)) + (weighted ? " weight" : ""));
      const shape_t shape{5, 6};
      const tensor t = make_tensor(shape, dtype::float64, probability_targets(rng, shape));
      const tensor w = make_tensor({6}, dtype::float64, uniform_values(rng, 6, 0.2, 2.0));
      std::optional<array_view> weight;
      if (weighted) weight = w.view();
      expect_gradient_matches_finite_differences(
          [&](const tensor& x, const softce::outputs& out) {
            return softce::cross_entropy_with_probs(x.view(), t.view(), weight, r, out);
          },
          [&](const tensor& x, const softce::outputs& out) {
            return ref::cross_entropy_with_probs(x.view(), t.view(), weight, r, out);
          },
          shape, normal_values(rng, 30, 2.0), rng);
    }
}

TEST(Gradient, KlDiv) {
  std::mt19937_64 rng(705);
  for (reduction r : {reduction::none, reduction::mean, reduction::sum, reduction::batchmean})
    for (bool log_target : {false, true}) {
      SCOPED_TRACE(std::string(reduction_text(r)) + (log_target ? " log_target" : ""));
      const shape_t shape{3, 4, 5};
      std::vector<double> t = uniform_values(rng, 60, 0.0, 1.0);
      for (auto& v : t) {
        if (rng() % 4 == 0) v = 0;
        if (log_target) v = std::log(v);
      }
      const tensor target = make_tensor(shape, dtype::float64, t);
      softce::kl_div_options o;
      o.reduce = r;
      o.log_target = log_target;
      expect_gradient_matches_finite_differences(
          [&](const tensor& x, const softce::outputs& out) { return softce::kl_div(x.view(), target.view(), o, out); },
          [&](const tensor& x, const softce::outputs& out) { return ref::kl_div(x.view(), target.view(), o, out); }, shape,
          uniform_values(rng, 60, -4.0, 0.0), rng);
    }
}

TEST(Gradient, BinaryCrossEntropyWithLogits) {
  std::mt19937_64 rng(706);
  for (reduction r : row_reductions)
    for (bool weighted : {false, true})
      for (bool pos_weighted : {false, true}) {
        SCOPED_TRACE(std::string(reduction_text(r)) + (weighted ? " weight" : "") + (pos_weighted ? " pos_weight" : ""));
        const shape_t shape{4, 6};
        const tensor target = make_tensor(shape, dtype::float64, uniform_values(rng, 24, 0.0, 1.0));
        const tensor w = make_tensor({4, 1}, dtype::float64, uniform_values(rng, 4, 0.2, 2.0));
        const tensor pw = make_tensor({6}, dtype::float64, uniform_values(rng, 6, 0.2, 4.0));
        softce::bce_options o;
        o.reduce = r;
        if (weighted) o.weight = w.view();
        if (pos_weighted) o.pos_weight = pw.view();
        expect_gradient_matches_finite_differences(
            [&](const tensor& x, const softce::outputs& out) {
              return softce::binary_cross_entropy_with_logits(x.view(), target.view(), o, out);
            },
            [&](const tensor& x, const softce::outputs& out) {
              return ref::binary_cross_entropy_with_logits(x.view(), target.view(), o, out);
            },
            shape, normal_values(rng, 24, 3.0), rng);
      }
}

TEST(Gradient, DistillationTeacherLogits) {
  std::mt19937_64 rng(707);
  struct kind_beta { divergence kind; double beta; };
  const kind_beta kinds[] = {{divergence::kl, 0.5}, {divergence::reverse_kl, 0.5}, {divergence::jsd, 0.3},
                             {divergence::jsd, 0.5}, {divergence::jsd, 0.0}, {divergence::jsd, 1.0}};
  for (const shape_t& shape : shapes)
    for (const kind_beta& kb : kinds)
      for (double T : {1.0, 2.5})
        for (reduction r : {reduction::none, reduction::mean, reduction::sum, reduction::batchmean})
          for (bool masked : {false, true}) {
            SCOPED_TRACE(describe(shape, r) + " " + divergence_text(kb.kind) + " beta " + std::to_string(kb.beta) + " T " +
                         std::to_string(T) + (masked ? " mask" : ""));
            const shape_t rs = row_shape_of(shape);
            const tensor z = make_tensor(shape, dtype::float64, normal_values(rng, product(shape), 2.0));
            std::vector<std::int64_t> m(static_cast<std::size_t>(product(rs)));
            for (auto& b : m) b = rng() % 3 != 0;
            const tensor mask = make_index_tensor(rs, dtype::boolean, m);
            softce::distillation_options o;
            if (shape.size() >= 3) o.dim = 1;  // PyTorch's (N, C, d1, ...) layout
            o.kind = kb.kind;
            o.beta = kb.beta;
            o.temperature = T;
            o.reduce = r;
            if (masked) o.mask = mask.view();
            expect_gradient_matches_finite_differences(
                [&](const tensor& x, const softce::outputs& out) { return softce::distillation_loss(x.view(), z.view(), o, out); },
                [&](const tensor& x, const softce::outputs& out) { return ref::distillation_loss(x.view(), z.view(), o, out); },
                shape, normal_values(rng, product(shape), 2.0), rng);
          }
}

TEST(Gradient, DistillationTopKTeacher) {
  std::mt19937_64 rng(708);
  for (const shape_t& shape : shapes)
    for (bool tail : {false, true})
      for (double T : {1.0, 2.5})
        for (reduction r : {reduction::none, reduction::mean, reduction::sum, reduction::batchmean}) {
          SCOPED_TRACE(describe(shape, r) + (tail ? " tail" : "") + " T " + std::to_string(T));
          const topk_data d = random_topk(rng, shape, 3, !tail);
          const tensor idx = make_index_tensor(d.shape, dtype::int64, d.indices);
          const tensor val = make_tensor(d.shape, dtype::float64, d.values);
          softce::distillation_options o;
          if (shape.size() >= 3) o.dim = 1;  // PyTorch's (N, C, d1, ...) layout
          o.temperature = T;
          o.reduce = r;
          const softce::topk k{idx.view(), val.view(), tail};
          expect_gradient_matches_finite_differences(
              [&](const tensor& x, const softce::outputs& out) { return softce::distillation_loss(x.view(), k, o, out); },
              [&](const tensor& x, const softce::outputs& out) { return ref::distillation_loss(x.view(), k, o, out); }, shape,
              normal_values(rng, product(shape), 2.0), rng);
        }
}

}  // namespace
}  // namespace softce_test
