// softce/aggregate.hpp: majority vote, vote fractions and Dawid–Skene against a naive float64
// implementation written here (dense loops over the wide votes matrix, std::exp, no
// indexes, no threads), the long layout against the wide one, results bitwise identical for
// any thread count, and every validation error with its exact message.
#include <softce/aggregate.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace {

namespace agg = softce::aggregate;

struct votes_matrix {
  std::int64_t items = 0, annotators = 0, classes = 0;
  std::vector<std::int64_t> labels;  // (items, annotators), -1 = no vote
  std::vector<std::int64_t> truth;   // (items)
  agg::wide_votes wide() const { return {labels.data(), items, annotators}; }
};

// Annotators with class-dependent confusion: annotator j is right with probability
// accuracy[j], otherwise picks a "neighbour" class (k ± 1) twice as often as any other;
// abstains with probability `abstain`; every item keeps at least one vote.
votes_matrix simulate(std::int64_t items, std::int64_t annotators, std::int64_t classes,
                      double abstain, std::uint32_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(0, 1);
  votes_matrix v;
  v.items = items, v.annotators = annotators, v.classes = classes;
  v.labels.assign(items * annotators, -1);
  v.truth.resize(items);
  std::vector<double> accuracy(annotators);
  for (std::int64_t j = 0; j < annotators; ++j) accuracy[j] = 0.45 + 0.5 * u(rng);
  for (std::int64_t i = 0; i < items; ++i) {
    const std::int64_t k = static_cast<std::int64_t>(u(rng) * classes);
    v.truth[i] = k;
    for (std::int64_t j = 0; j < annotators; ++j) {
      if (u(rng) < abstain) continue;
      std::int64_t l = k;
      if (u(rng) > accuracy[j]) {
        l = u(rng) < 0.5 ? (k + 1) % classes : (k + classes - 1) % classes;
        if (u(rng) < 0.3) l = static_cast<std::int64_t>(u(rng) * classes);
      }
      v.labels[i * annotators + j] = l;
    }
    bool any = false;
    for (std::int64_t j = 0; j < annotators; ++j) any = any || v.labels[i * annotators + j] >= 0;
    if (!any) v.labels[i * annotators + (i % annotators)] = k;
  }
  return v;
}

// ---- the naive float64 implementation ---------------------------------------------------

std::vector<double> naive_fractions(const votes_matrix& v) {
  const std::int64_t C = v.classes;
  std::vector<double> p(v.items * C, 0.0);
  for (std::int64_t i = 0; i < v.items; ++i) {
    double n = 0;
    for (std::int64_t j = 0; j < v.annotators; ++j)
      if (v.labels[i * v.annotators + j] >= 0) {
        p[i * C + v.labels[i * v.annotators + j]] += 1;
        n += 1;
      }
    for (std::int64_t k = 0; k < C; ++k) p[i * C + k] /= n;
  }
  return p;
}

struct naive_result {
  std::vector<double> probabilities, priors, confusion;  // confusion (A, C_true, C_vote)
  double log_likelihood = 0;
  int iterations = 0;
};

naive_result naive_dawid_skene(const votes_matrix& v, int iterations, double tolerance,
                               double smoothing, double floor) {
  const std::int64_t N = v.items, A = v.annotators, C = v.classes;
  naive_result r;
  std::vector<double> T = naive_fractions(v);
  std::vector<double> prior(C), conf(A * C * C);
  auto m_step = [&] {
    for (std::int64_t k = 0; k < C; ++k) {
      prior[k] = 0;
      for (std::int64_t i = 0; i < N; ++i) prior[k] += T[i * C + k];
      prior[k] /= N;
    }
    for (std::int64_t j = 0; j < A; ++j) {
      std::vector<bool> used(C, false);
      for (std::int64_t i = 0; i < N; ++i)
        if (v.labels[i * A + j] >= 0) used[v.labels[i * A + j]] = true;
      for (std::int64_t k = 0; k < C; ++k) {
        std::vector<double> count(C, 0.0);
        for (std::int64_t i = 0; i < N; ++i)
          if (const std::int64_t l = v.labels[i * A + j]; l >= 0) count[l] += T[i * C + k];
        double total = 0;
        for (std::int64_t l = 0; l < C; ++l) {
          count[l] += smoothing;
          if (used[l]) count[l] = std::max(count[l], floor);
          total += count[l];
        }
        for (std::int64_t l = 0; l < C; ++l)
          conf[(j * C + k) * C + l] = total > 0 ? count[l] / total : 1.0 / C;
      }
    }
  };
  m_step();
  double previous = -std::numeric_limits<double>::infinity();
  for (int it = 1; it <= iterations; ++it) {
    double ll = 0;
    for (std::int64_t i = 0; i < N; ++i) {
      std::vector<double> lp(C);
      for (std::int64_t k = 0; k < C; ++k) {
        lp[k] = std::log(std::max(prior[k], floor));
        for (std::int64_t j = 0; j < A; ++j)
          if (const std::int64_t l = v.labels[i * A + j]; l >= 0)
            lp[k] += std::log(conf[(j * C + k) * C + l]);
      }
      const double m = *std::max_element(lp.begin(), lp.end());
      double s = 0;
      for (std::int64_t k = 0; k < C; ++k) s += std::exp(lp[k] - m);
      for (std::int64_t k = 0; k < C; ++k) T[i * C + k] = std::exp(lp[k] - m) / s;
      ll += m + std::log(s);
    }
    m_step();
    r.iterations = it;
    r.log_likelihood = ll;
    if (tolerance > 0 && it > 1 && ll / N - previous < tolerance) break;
    previous = ll / N;
  }
  r.probabilities = T;
  r.priors = prior;
  r.confusion = conf;
  return r;
}

double max_abs_difference(const std::vector<double>& a, const std::vector<double>& b) {
  EXPECT_EQ(a.size(), b.size());
  double d = 0;
  for (std::size_t i = 0; i < a.size() && i < b.size(); ++i) d = std::max(d, std::fabs(a[i] - b[i]));
  return d;
}

struct thread_count_guard {
  int saved = softce::get_num_threads();
  ~thread_count_guard() { softce::set_num_threads(saved); }
};

// ---- majority and vote fractions ----------------------------------------------------------

TEST(Aggregate, MajorityBreaksTiesToTheLowestClass) {
  const std::vector<std::int64_t> labels = {
      2, 1, -1,  // tie 1 vs 2: 1
      0, 2, 2,   // 2
      3, -1, -1, // 3
      3, 1, 0,   // three-way tie: 0
  };
  EXPECT_EQ(agg::majority(agg::wide_votes{labels.data(), 4, 3}, 4),
            (std::vector<std::int64_t>{1, 2, 3, 0}));
}

TEST(Aggregate, MajorityAndFractionsMatchTheNaiveCount) {
  const votes_matrix v = simulate(3000, 7, 6, 0.3, 1);
  const std::vector<double> naive = naive_fractions(v);
  EXPECT_LE(max_abs_difference(agg::vote_fractions(v.wide(), v.classes), naive), 1e-15);
  const std::vector<std::int64_t> m = agg::majority(v.wide(), v.classes);
  for (std::int64_t i = 0; i < v.items; ++i) {
    std::int64_t best = 0;
    for (std::int64_t k = 1; k < v.classes; ++k)
      if (naive[i * v.classes + k] > naive[i * v.classes + best]) best = k;
    ASSERT_EQ(m[i], best) << "item " << i;
  }
}

// ---- Dawid–Skene against the naive implementation -----------------------------------------

void expect_matches_naive(const votes_matrix& v, int iterations, double tolerance,
                          double smoothing, double floor) {
  agg::dawid_skene_options o;
  o.max_iterations = iterations;
  o.tolerance = tolerance;
  o.smoothing = smoothing;
  o.floor = floor;
  const agg::dawid_skene_result r = agg::dawid_skene(v.wide(), v.classes, o);
  const naive_result n = naive_dawid_skene(v, iterations, tolerance, smoothing, floor);
  EXPECT_EQ(r.iterations, n.iterations);
  EXPECT_LE(max_abs_difference(r.probabilities, n.probabilities), 1e-12);
  EXPECT_LE(max_abs_difference(r.priors, n.priors), 1e-13);
  EXPECT_LE(max_abs_difference(r.confusion, n.confusion), 1e-12);
  EXPECT_NEAR(r.log_likelihood, n.log_likelihood, 1e-9 * std::fabs(n.log_likelihood));
  EXPECT_NEAR(r.log_likelihood_per_item, n.log_likelihood / v.items, 1e-9);
  for (std::int64_t i = 0; i < v.items; ++i) {
    double s = 0;
    for (std::int64_t k = 0; k < v.classes; ++k) s += r.probabilities[i * v.classes + k];
    ASSERT_NEAR(s, 1.0, 1e-12);
  }
  for (std::int64_t j = 0; j < v.annotators; ++j) {
    double accuracy = 0;
    for (std::int64_t k = 0; k < v.classes; ++k)
      accuracy += r.priors[k] * r.confusion[(j * v.classes + k) * v.classes + k];
    EXPECT_DOUBLE_EQ(r.accuracy[j], accuracy);
  }
}

TEST(Aggregate, DawidSkeneMatchesNaiveFloat64) {
  expect_matches_naive(simulate(2000, 6, 5, 0.3, 2), 20, 0, 0, 1e-10);
}
TEST(Aggregate, DawidSkeneMatchesNaiveTwoClasses) {
  expect_matches_naive(simulate(1500, 4, 2, 0.2, 3), 30, 0, 0, 1e-10);
}
TEST(Aggregate, DawidSkeneMatchesNaiveManyClassesGenericPath) {
  // 23 classes: the run-time class-count kernels (2..16 are compiled for a fixed count)
  expect_matches_naive(simulate(800, 9, 23, 0.4, 4), 10, 0, 0, 1e-10);
}
TEST(Aggregate, DawidSkeneMatchesNaiveWithSmoothingAndNoFloor) {
  expect_matches_naive(simulate(1000, 5, 7, 0.2, 5), 15, 0, 0.5, 0);
}
TEST(Aggregate, DawidSkeneMatchesNaiveStoppingOnTolerance) {
  const votes_matrix v = simulate(1000, 5, 4, 0.1, 6);
  expect_matches_naive(v, 500, 1e-6, 0, 1e-10);
  agg::dawid_skene_options o;
  o.max_iterations = 500;
  o.tolerance = 1e-6;
  std::vector<double> history;
  o.on_iteration = [&](int it, double ll) {
    EXPECT_EQ(it, static_cast<int>(history.size()) + 1);
    history.push_back(ll);
  };
  const auto r = agg::dawid_skene(v.wide(), v.classes, o);
  EXPECT_TRUE(r.converged);
  EXPECT_LT(r.iterations, 500);
  ASSERT_EQ(history.size(), static_cast<std::size_t>(r.iterations));
  for (std::size_t t = 1; t < history.size(); ++t)  // EM never lowers the likelihood
    EXPECT_GE(history[t], history[t - 1] - 1e-12) << "iteration " << t + 1;
  EXPECT_LT(history.back() - history[history.size() - 2], 1e-6);
}

TEST(Aggregate, DawidSkeneRecoversAnnotatorsAndBeatsMajority) {
  const votes_matrix v = simulate(20000, 5, 10, 0.2, 7);
  agg::dawid_skene_options o;
  o.max_iterations = 50;
  const auto r = agg::dawid_skene(v.wide(), v.classes, o);
  const auto m = agg::majority(v.wide(), v.classes);
  std::int64_t ds_right = 0, mv_right = 0;
  for (std::int64_t i = 0; i < v.items; ++i) {
    const double* p = &r.probabilities[i * v.classes];
    ds_right += std::max_element(p, p + v.classes) - p == v.truth[i];
    mv_right += m[i] == v.truth[i];
  }
  EXPECT_GT(ds_right, mv_right);
  // estimated accuracy against each annotator's empirical accuracy on the true labels
  for (std::int64_t j = 0; j < v.annotators; ++j) {
    double right = 0, n = 0;
    for (std::int64_t i = 0; i < v.items; ++i)
      if (v.labels[i * v.annotators + j] >= 0) {
        n += 1;
        right += v.labels[i * v.annotators + j] == v.truth[i];
      }
    EXPECT_NEAR(r.accuracy[j], right / n, 0.02) << "annotator " << j;
    EXPECT_EQ(r.votes_per_annotator[j], static_cast<std::int64_t>(n));
  }
}

TEST(Aggregate, LongLayoutEqualsWide) {
  const votes_matrix v = simulate(1500, 6, 8, 0.3, 8);
  std::vector<std::int64_t> item, annotator, label;
  for (std::int64_t i = 0; i < v.items; ++i)
    for (std::int64_t j = 0; j < v.annotators; ++j)
      if (v.labels[i * v.annotators + j] >= 0) {
        item.push_back(i);
        annotator.push_back(j);
        label.push_back(v.labels[i * v.annotators + j]);
      }
  // shuffled: the long layout's order does not matter (beyond float rounding)
  std::vector<std::size_t> order(item.size());
  for (std::size_t n = 0; n < order.size(); ++n) order[n] = n;
  std::shuffle(order.begin(), order.end(), std::mt19937_64(9));
  std::vector<std::int64_t> item2, annotator2, label2;
  for (std::size_t n : order) {
    item2.push_back(item[n]);
    annotator2.push_back(annotator[n]);
    label2.push_back(label[n]);
  }
  const agg::long_votes lv{item2.data(), annotator2.data(), label2.data(),
                           static_cast<std::int64_t>(item2.size()), 0, 0};
  agg::dawid_skene_options o;
  o.max_iterations = 25;
  o.tolerance = 0;
  const auto wide = agg::dawid_skene(v.wide(), v.classes, o);
  const auto lng = agg::dawid_skene(lv, v.classes, o);
  EXPECT_EQ(lng.items, v.items);
  EXPECT_EQ(lng.annotators, v.annotators);
  EXPECT_LE(max_abs_difference(wide.probabilities, lng.probabilities), 1e-12);
  EXPECT_LE(max_abs_difference(wide.confusion, lng.confusion), 1e-12);
  EXPECT_EQ(agg::majority(lv, v.classes), agg::majority(v.wide(), v.classes));
  EXPECT_LE(max_abs_difference(agg::vote_fractions(lv, v.classes),
                               agg::vote_fractions(v.wide(), v.classes)),
            1e-15);
  // declared counts larger than the ids: an annotator without votes gets a uniform matrix
  const agg::long_votes declared{item2.data(), annotator2.data(), label2.data(),
                                 static_cast<std::int64_t>(item2.size()), v.items, v.annotators + 1};
  const auto extra = agg::dawid_skene(declared, v.classes, o);
  EXPECT_LE(max_abs_difference(wide.probabilities, extra.probabilities), 1e-12);
  const std::int64_t C = v.classes;
  for (std::int64_t c = 0; c < C * C; ++c)
    EXPECT_DOUBLE_EQ(extra.confusion[v.annotators * C * C + c], 1.0 / C);
  EXPECT_EQ(extra.votes_per_annotator[v.annotators], 0);
}

TEST(Aggregate, BitwiseIdenticalForAnyThreadCount) {
  thread_count_guard guard;
  const votes_matrix v = simulate(60000, 5, 10, 0.2, 10);
  agg::dawid_skene_options o;
  o.max_iterations = 8;
  o.tolerance = 0;
  softce::set_num_threads(1);
  const auto one = agg::dawid_skene(v.wide(), v.classes, o);
  const auto fractions_one = agg::vote_fractions(v.wide(), v.classes);
  for (int threads : {2, 3, 7}) {
    SCOPED_TRACE("threads " + std::to_string(threads));
    softce::set_num_threads(threads);
    const auto r = agg::dawid_skene(v.wide(), v.classes, o);
    ASSERT_EQ(r.probabilities.size(), one.probabilities.size());
    EXPECT_EQ(0, std::memcmp(r.probabilities.data(), one.probabilities.data(),
                             one.probabilities.size() * sizeof(double)));
    EXPECT_EQ(0, std::memcmp(r.confusion.data(), one.confusion.data(),
                             one.confusion.size() * sizeof(double)));
    EXPECT_EQ(0, std::memcmp(r.priors.data(), one.priors.data(), one.priors.size() * sizeof(double)));
    EXPECT_EQ(0, std::memcmp(&r.log_likelihood, &one.log_likelihood, sizeof(double)));
    const auto f = agg::vote_fractions(v.wide(), v.classes);
    EXPECT_EQ(0, std::memcmp(f.data(), fractions_one.data(), f.size() * sizeof(double)));
  }
}

// ---- errors -------------------------------------------------------------------------------

template <class F>
void expect_error(F&& call, const std::string& message) {
  try {
    call();
    ADD_FAILURE() << "expected softce::error: " << message;
  } catch (const softce::error& e) {
    EXPECT_EQ(std::string(e.what()), message);
  }
}

TEST(Aggregate, Errors) {
  const std::vector<std::int64_t> bad = {0, 1, 10, -1};
  expect_error([&] { agg::majority(agg::wide_votes{bad.data(), 2, 2}, 10); },
               "majority: votes: expected class ids in [-1, 10), got 10 at [1, 0]");
  const std::vector<std::int64_t> minus2 = {0, -2};
  expect_error([&] { agg::vote_fractions(agg::wide_votes{minus2.data(), 1, 2}, 3); },
               "vote_fractions: votes: expected class ids in [-1, 3), got -2 at [0, 1]");
  const std::vector<std::int64_t> empty_item = {0, 1, -1, -1, 2, -1};
  expect_error([&] { agg::dawid_skene(agg::wide_votes{empty_item.data(), 3, 2}, 3); },
               "dawid_skene: votes: expected at least one vote per item, got none for item 1 "
               "(drop the item or give it a vote)");
  expect_error([&] { agg::dawid_skene(agg::wide_votes{empty_item.data(), 3, 2}, 0); },
               "dawid_skene: classes: expected a value >= 1, got 0");
  const std::int64_t big = std::numeric_limits<std::int64_t>::max() / 2;
  expect_error([&] { agg::dawid_skene(agg::wide_votes{empty_item.data(), big, 4}, 3); },
               "dawid_skene: votes: expected a size that fits in memory, got " +
                   std::to_string(big) + " x 4 (overflows)");
  agg::dawid_skene_options o;
  o.max_iterations = 0;
  expect_error([&] { agg::dawid_skene(agg::wide_votes{empty_item.data(), 3, 2}, 3, o); },
               "dawid_skene: max_iterations: expected a value >= 1, got 0");
  o.max_iterations = 10;
  o.tolerance = std::nan("");
  expect_error([&] { agg::dawid_skene(agg::wide_votes{empty_item.data(), 3, 2}, 3, o); },
               "dawid_skene: tolerance: expected a finite value >= 0, got nan");

  // long layout
  const std::vector<std::int64_t> item = {0, 1, 1}, annotator = {0, 0, 5}, label = {1, 2, 0};
  expect_error([&] {
    agg::dawid_skene(agg::long_votes{item.data(), annotator.data(), label.data(), 3, 0, 4}, 3);
  }, "dawid_skene: annotator: expected ids in [0, 4), got 5 at [2]");
  const std::vector<std::int64_t> negative_item = {0, -1, 1};
  expect_error([&] {
    agg::majority(agg::long_votes{negative_item.data(), annotator.data(), label.data(), 3, 0, 0}, 3);
  }, "majority: item: expected ids in [0, 576460752303423487), got -1 at [1]");
  const std::vector<std::int64_t> bad_label = {1, 3, 0};
  expect_error([&] {
    agg::vote_fractions(agg::long_votes{item.data(), annotator.data(), bad_label.data(), 3, 0, 0}, 3);
  }, "vote_fractions: label: expected class ids in [0, 3), got 3 at [1]");
  const std::vector<std::int64_t> gap = {0, 2, 2};  // item 1 has no vote
  expect_error([&] {
    agg::dawid_skene(agg::long_votes{gap.data(), annotator.data(), label.data(), 3, 0, 0}, 3);
  }, "dawid_skene: votes: expected at least one vote per item, got none for item 1 (drop the "
     "item or give it a vote)");
  const std::vector<std::int64_t> huge = {0, std::numeric_limits<std::int64_t>::max() / 4, 1};
  expect_error([&] {
    agg::dawid_skene(agg::long_votes{item.data(), huge.data(), label.data(), 3, 0, 0}, 3);
  }, "dawid_skene: annotator: expected ids in [0, 576460752303423487), got " +
         std::to_string(std::numeric_limits<std::int64_t>::max() / 4) + " at [1]");
}

}  // namespace
