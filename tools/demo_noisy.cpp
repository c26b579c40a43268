// softce CLI — the demo's noisy-votes scenario: soft labels made from several noisy votes per
// image (softce/aggregate.hpp), against hard labels made from the same votes.
//
// The annotators (documented in docs/cli.md; every draw from one splitmix64 generator seeded
// with --seed, in image order, so the votes are the same on every machine):
//   * image ambiguity: with the class means μ_c of the training images (pixels / 255) and
//     d_c(x) = mean squared distance of image x to μ_c, the margin of an image of class k is
//     m(x) = min_{c≠k} d_c(x) − d_k(x); its ambiguity a(x) = 1 / (1 + exp(m(x) / s)) with s
//     half the median margin (a typical image: a ≈ 0.12; one as close to another class's mean
//     as to its own: 0.5).
//   * annotator j errs on image x of class k with probability
//     e = min(0.9, base_j · difficulty_k · (0.3 + 1.4 · a(x))), base = 0.15, 0.25, 0.35, 0.45;
//     difficulty: shirt 1.4, T-shirt/top, pullover, coat 1.0, dress 0.8, sandal, sneaker,
//     ankle boot 0.7, bag 0.4, trouser 0.3. An error picks class c ≠ k with probability
//     ∝ similarity(k, c) · exp(−(d_c(x) − min_{c'≠k} d_c'(x)) / s): similar garments
//     (shirt–T-shirt, shirt–pullover, shirt–coat, pullover–coat, sandal–sneaker,
//     sneaker–ankle boot: 1; T-shirt–pullover, T-shirt–dress, dress–coat, dress–shirt,
//     sandal–ankle boot, trouser–dress: 0.4; any other pair 0.02) and, among them, the class
//     whose mean this image is closest to.
//   * annotator 5 is careless: 60% of its votes are uniform over the 10 classes.
//   * annotators abstain with probability 0.1, 0.2, 0.3, 0.2, 0.4; an image left without
//     votes gets annotator (i mod 5)'s.
#include "demo_noisy.hpp"

#include <softce/aggregate.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>

#include "model.hpp"
#include "progress.hpp"
#include "training.hpp"

namespace softce::cli {

namespace {

constexpr std::int64_t C = 10;
constexpr int annotator_count = 5;

struct simulation {
  std::vector<std::int64_t> votes;  // (N, annotators), -1 = no vote
  std::vector<double> ambiguity;    // (N)
  std::vector<double> error_rate;   // (annotators): fraction of votes that are wrong
  std::vector<double> abstained;    // (annotators)
};

// Mean squared distance of each image to each class mean; (rows, C).
std::vector<double> distances(const table& images, const std::vector<double>& means) {
  const std::int64_t D = images.cols;
  std::vector<double> d(static_cast<std::size_t>(images.rows * C));
  for (std::int64_t i = 0; i < images.rows; ++i)
    for (std::int64_t c = 0; c < C; ++c) {
      double s = 0;
      for (std::int64_t p = 0; p < D; ++p) {
        const double diff = images.at(i, p) / 255.0 - means[c * D + p];
        s += diff * diff;
      }
      d[i * C + c] = s / static_cast<double>(D);
    }
  return d;
}

double margin(const double* d, std::int64_t k) {
  double other = INFINITY;
  for (std::int64_t c = 0; c < C; ++c)
    if (c != k) other = std::min(other, d[c]);
  return other - d[k];
}

struct prototypes {
  std::vector<double> means;  // (C, D)
  double scale = 1;           // s: half the median margin of the training images
};

prototypes fit_prototypes(const table& images, const targets& labels) {
  const std::int64_t D = images.cols;
  prototypes p;
  p.means.assign(static_cast<std::size_t>(C * D), 0.0);
  std::vector<double> count(C, 0);
  for (std::int64_t i = 0; i < images.rows; ++i) {
    const std::int64_t k = labels.index[i];
    count[k] += 1;
    for (std::int64_t q = 0; q < D; ++q) p.means[k * D + q] += images.at(i, q) / 255.0;
  }
  for (std::int64_t c = 0; c < C; ++c)
    for (std::int64_t q = 0; q < D; ++q) p.means[c * D + q] /= std::max(1.0, count[c]);
  return p;
}

std::vector<double> ambiguity_of(const table& images, const targets& labels, prototypes& p,
                                 bool set_scale, std::vector<double>* distance_out = nullptr) {
  std::vector<double> d = distances(images, p.means);
  std::vector<double> m(images.rows);
  for (std::int64_t i = 0; i < images.rows; ++i) m[i] = margin(&d[i * C], labels.index[i]);
  if (set_scale) {
    std::vector<double> sorted = m;
    std::nth_element(sorted.begin(), sorted.begin() + sorted.size() / 2, sorted.end());
    p.scale = std::max(1e-6, sorted[sorted.size() / 2] / 2);
  }
  std::vector<double> a(images.rows);
  for (std::int64_t i = 0; i < images.rows; ++i) a[i] = 1.0 / (1.0 + std::exp(m[i] / p.scale));
  if (distance_out) *distance_out = std::move(d);
  return a;
}

simulation simulate_annotators(const table& images, const targets& labels, prototypes& p,
                               std::uint64_t seed) {
  const double base[annotator_count] = {0.15, 0.25, 0.35, 0.45, 0.0};
  const double abstain[annotator_count] = {0.1, 0.2, 0.3, 0.2, 0.4};
  const double difficulty[C] = {1.0, 0.3, 1.0, 0.8, 1.0, 0.7, 1.4, 0.7, 0.4, 0.7};
  double similarity[C][C];
  for (auto& row : similarity)
    for (double& v : row) v = 0.02;
  const auto pair = [&](int a, int b, double v) { similarity[a][b] = similarity[b][a] = v; };
  // 0 T-shirt/top, 1 Trouser, 2 Pullover, 3 Dress, 4 Coat, 5 Sandal, 6 Shirt, 7 Sneaker,
  // 8 Bag, 9 Ankle boot
  pair(6, 0, 1), pair(6, 2, 1), pair(6, 4, 1), pair(2, 4, 1), pair(5, 7, 1), pair(7, 9, 1);
  pair(0, 2, 0.4), pair(0, 3, 0.4), pair(3, 4, 0.4), pair(3, 6, 0.4), pair(5, 9, 0.4),
      pair(1, 3, 0.4);

  simulation s;
  std::vector<double> d;
  s.ambiguity = ambiguity_of(images, labels, p, true, &d);
  const std::int64_t N = images.rows;
  s.votes.assign(static_cast<std::size_t>(N * annotator_count), -1);
  std::vector<double> wrong(annotator_count, 0), cast(annotator_count, 0), skipped(annotator_count, 0);
  random_generator rng(seed ^ 0x6e6f697379ull);  // "noisy"
  for (std::int64_t i = 0; i < N; ++i) {
    const std::int64_t k = labels.index[i];
    const double* di = &d[i * C];
    double nearest_other = INFINITY;
    for (std::int64_t c = 0; c < C; ++c)
      if (c != k) nearest_other = std::min(nearest_other, di[c]);
    double weight[C], total = 0;
    for (std::int64_t c = 0; c < C; ++c) {
      weight[c] = c == k ? 0.0 : similarity[k][c] * std::exp(-(di[c] - nearest_other) / p.scale);
      total += weight[c];
    }
    bool any = false;
    std::int64_t vote_of[annotator_count];
    for (int j = 0; j < annotator_count; ++j) {
      // every draw is made whether or not it is used, so one annotator's choices do not
      // shift another's
      const double u_abstain = rng.uniform(), u_err = rng.uniform(), u_pick = rng.uniform();
      std::int64_t vote = k;
      if (j == annotator_count - 1) {  // careless
        if (u_err < 0.6) vote = std::min<std::int64_t>(C - 1, static_cast<std::int64_t>(u_pick * C));
      } else {
        const double e = std::min(0.9, base[j] * difficulty[k] * (0.3 + 1.4 * s.ambiguity[i]));
        if (u_err < e) {
          double target = u_pick * total, acc = 0;
          vote = k == 0 ? 1 : 0;
          for (std::int64_t c = 0; c < C; ++c) {
            if (weight[c] <= 0) continue;
            vote = c;
            acc += weight[c];
            if (target < acc) break;
          }
        }
      }
      vote_of[j] = vote;
      if (u_abstain < abstain[j]) {
        skipped[j] += 1;
        continue;
      }
      s.votes[i * annotator_count + j] = vote;
      any = true;
    }
    if (!any) {
      const int j = static_cast<int>(i % annotator_count);
      s.votes[i * annotator_count + j] = vote_of[j];
      skipped[j] -= 1;
    }
    for (int j = 0; j < annotator_count; ++j)
      if (const std::int64_t v = s.votes[i * annotator_count + j]; v >= 0) {
        cast[j] += 1;
        wrong[j] += v != k;
      }
  }
  for (int j = 0; j < annotator_count; ++j) {
    s.error_rate.push_back(cast[j] > 0 ? wrong[j] / cast[j] : 0.0);
    s.abstained.push_back(skipped[j] / static_cast<double>(N));
  }
  return s;
}

targets index_targets(const std::vector<std::int64_t>& index) {
  targets t;
  t.kind = target_kind::index;
  t.rows = static_cast<std::int64_t>(index.size());
  t.classes = C;
  t.index = index;
  t.label = index;
  return t;
}

targets probability_targets(const std::vector<double>& p) {
  targets t;
  t.kind = target_kind::probability;
  t.rows = static_cast<std::int64_t>(p.size()) / C;
  t.classes = C;
  t.probability.assign(p.begin(), p.end());
  t.label.resize(t.rows);
  for (std::int64_t i = 0; i < t.rows; ++i)
    t.label[i] = std::max_element(&p[i * C], &p[i * C] + C) - &p[i * C];
  return t;
}

struct stats {
  double mean = 0, std = 0;
};
stats mean_std(const std::vector<double>& v) {
  stats s;
  for (double x : v) s.mean += x;
  s.mean /= static_cast<double>(v.size());
  for (double x : v) s.std += (x - s.mean) * (x - s.mean);
  s.std = v.size() > 1 ? std::sqrt(s.std / static_cast<double>(v.size() - 1)) : 0.0;
  return s;
}

struct method_runs {
  std::string name, description;
  const targets* t = nullptr;
  double label_smoothing = 0;
  std::vector<evaluation> test, ambiguous;
  std::vector<std::vector<double>> epoch_accuracy, epoch_nll;  // [seed][epoch]
  double seconds = 0;
};

}  // namespace

noisy_outcome run_noisy_scenario(const table& train_images, const targets& train_labels,
                                 const table& test_images, const targets& test_labels,
                                 const noisy_config& config) {
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  const std::int64_t N = train_images.rows, N_test = test_images.rows, D = train_images.cols;

  // 1. votes
  prototypes proto = fit_prototypes(train_images, train_labels);
  const simulation sim = simulate_annotators(train_images, train_labels, proto, config.seed);
  std::vector<double> test_ambiguity = ambiguity_of(test_images, test_labels, proto, false);

  // 2. targets from the votes
  namespace agg = softce::aggregate;
  const agg::wide_votes votes{sim.votes.data(), N, annotator_count};
  const auto aggregate_start = clock::now();
  const std::vector<std::int64_t> majority = agg::majority(votes, C);
  const std::vector<double> fractions = agg::vote_fractions(votes, C);
  agg::dawid_skene_options ds_options;  // defaults: 100 iterations at most, tolerance 1e-5
  const agg::dawid_skene_result ds = agg::dawid_skene(votes, C, ds_options);
  const double aggregate_seconds =
      std::chrono::duration<double>(clock::now() - aggregate_start).count();
  const targets majority_t = index_targets(majority);
  const targets fractions_t = probability_targets(fractions);
  const targets ds_t = probability_targets(ds.probabilities);

  // label quality on the training set
  const auto quality = [&](const std::vector<double>* p, const std::vector<std::int64_t>& label) {
    double right = 0, p_true = 0, entropy = 0;
    for (std::int64_t i = 0; i < N; ++i) {
      right += label[i] == train_labels.index[i];
      if (p) {
        p_true += (*p)[i * C + train_labels.index[i]];
        for (std::int64_t c = 0; c < C; ++c)
          if ((*p)[i * C + c] > 0) entropy -= (*p)[i * C + c] * std::log((*p)[i * C + c]);
      } else {
        p_true += label[i] == train_labels.index[i];
      }
    }
    return nlohmann::json{{"label_accuracy", right / N},
                          {"mean_probability_of_true_class", p_true / N},
                          {"mean_entropy", entropy / N}};
  };

  // 3. the same student on each target, `seeds` seeds
  std::vector<method_runs> methods(5);
  const auto set = [&](int k, const char* name, const char* description, const targets* t,
                       double smoothing) {
    methods[k].name = name;
    methods[k].description = description;
    methods[k].t = t;
    methods[k].label_smoothing = smoothing;
  };
  set(0, "clean", "true labels, class indices (the ceiling)", &train_labels, 0);
  set(1, "majority", "majority vote, class indices", &majority_t, 0);
  set(2, "vote_fractions", "vote fractions, probabilities", &fractions_t, 0);
  set(3, "dawid_skene", "Dawid-Skene posteriors, probabilities", &ds_t, 0);
  set(4, "majority_ls", "majority vote + label smoothing", &majority_t, config.label_smoothing);
  char smoothing_name[64];
  std::snprintf(smoothing_name, sizeof smoothing_name, "majority vote + label smoothing %.2g",
                config.label_smoothing);
  methods[4].description = smoothing_name;

  // the most ambiguous fifth of the test images (by the annotators' ambiguity model)
  std::vector<std::int64_t> order(N_test);
  for (std::int64_t i = 0; i < N_test; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](std::int64_t a, std::int64_t b) { return test_ambiguity[a] > test_ambiguity[b]; });
  const std::int64_t n_ambiguous = std::max<std::int64_t>(1, N_test / 5);
  std::vector<std::int64_t> ambiguous(order.begin(), order.begin() + n_ambiguous);
  targets ambiguous_labels;
  ambiguous_labels.kind = target_kind::index;
  ambiguous_labels.rows = n_ambiguous;
  ambiguous_labels.classes = C;
  for (std::int64_t i : ambiguous) ambiguous_labels.index.push_back(test_labels.index[i]);
  ambiguous_labels.label = ambiguous_labels.index;

  for (auto& mr : methods) {
    const auto method_start = clock::now();
    for (int s = 0; s < config.seeds; ++s) {
      const std::uint64_t seed = config.seed + 101 + static_cast<std::uint64_t>(s);
      model m = make_model(D, config.hidden, C, seed);
      fit_standardization(m, train_images.values.data(), N);
      train_config tc;
      tc.epochs = config.epochs;
      tc.batch_size = config.batch_size;
      tc.lr = config.lr;
      tc.seed = seed;
      tc.loss.label_smoothing = mr.label_smoothing;
      progress bar("noisy " + mr.name + " seed " + std::to_string(s + 1), config.epochs,
                   config.progress);
      std::vector<double> accuracy, nll;
      train_hooks hooks;
      hooks.on_batch = [&](int e, std::int64_t done, std::int64_t total, double l) {
        bar.batch(e, done, total, l);
      };
      hooks.on_epoch = [&](epoch_record& record) {
        auto logits = predict_logits(m, test_images.values.data(), N_test);
        evaluation e = evaluate(logits.data(), N_test, C, test_labels);
        accuracy.push_back(e.accuracy);
        nll.push_back(e.nll);
        char extra[96];
        std::snprintf(extra, sizeof extra, "test_accuracy %.4f  test_nll %.4f", e.accuracy, e.nll);
        bar.epoch(record.epoch, record.train_loss, extra);
      };
      train(m, train_images.values.data(), N, *mr.t, tc, hooks);
      bar.finish();
      const auto logits = predict_logits(m, test_images.values.data(), N_test);
      mr.test.push_back(evaluate(logits.data(), N_test, C, test_labels));
      std::vector<float> sub(static_cast<std::size_t>(n_ambiguous * C));
      for (std::int64_t r = 0; r < n_ambiguous; ++r)
        std::copy(&logits[ambiguous[r] * C], &logits[ambiguous[r] * C] + C, &sub[r * C]);
      mr.ambiguous.push_back(evaluate(sub.data(), n_ambiguous, C, ambiguous_labels));
      mr.epoch_accuracy.push_back(accuracy);
      mr.epoch_nll.push_back(nll);
    }
    mr.seconds = std::chrono::duration<double>(clock::now() - method_start).count();
  }

  // 4. results
  noisy_outcome out;
  nlohmann::json& j = out.json;
  nlohmann::json annotators = nlohmann::json::array();
  for (int a = 0; a < annotator_count; ++a)
    annotators.push_back({{"annotator", a},
                          {"actual_accuracy", 1 - sim.error_rate[a]},
                          {"dawid_skene_accuracy", ds.accuracy[a]},
                          {"abstained", sim.abstained[a]},
                          {"votes", ds.votes_per_annotator[a]}});
  j["simulation"] = {{"annotators", annotators},
                     {"seed", config.seed},
                     {"model", "see docs/cli.md: class- and image-dependent confusion, one "
                               "careless annotator, abstentions"},
                     {"ambiguity_scale", proto.scale}};
  j["labels"] = {{"majority", quality(nullptr, majority)},
                 {"vote_fractions", quality(&fractions, fractions_t.label)},
                 {"dawid_skene", quality(&ds.probabilities, ds_t.label)}};
  j["dawid_skene"] = {{"iterations", ds.iterations},
                      {"converged", ds.converged},
                      {"log_likelihood_per_item", ds.log_likelihood_per_item},
                      {"aggregation_seconds", aggregate_seconds}};
  j["config"] = {{"student", config.hidden},
                 {"epochs", config.epochs},
                 {"seeds", config.seeds},
                 {"batch_size", config.batch_size},
                 {"lr", config.lr},
                 {"label_smoothing", config.label_smoothing},
                 {"ambiguous_test_images", n_ambiguous}};
  j["students"] = nlohmann::json::object();
  for (const auto& mr : methods) {
    std::vector<double> acc, nll, ece, amb_acc, amb_nll;
    for (std::size_t s = 0; s < mr.test.size(); ++s) {
      acc.push_back(mr.test[s].accuracy);
      nll.push_back(mr.test[s].nll);
      ece.push_back(mr.test[s].ece);
      amb_acc.push_back(mr.ambiguous[s].accuracy);
      amb_nll.push_back(mr.ambiguous[s].nll);
    }
    const auto ms = [](const std::vector<double>& v) {
      const stats s = mean_std(v);
      return nlohmann::json{{"mean", s.mean}, {"std", s.std}, {"seeds", v}};
    };
    j["students"][mr.name] = {{"targets", mr.description},
                              {"accuracy", ms(acc)},
                              {"nll", ms(nll)},
                              {"ece", ms(ece)},
                              {"ambiguous_accuracy", ms(amb_acc)},
                              {"ambiguous_nll", ms(amb_nll)},
                              {"train_seconds", mr.seconds}};
  }

  // charts: per-epoch means over the seeds, the first seed's reliability bins
  struct style { int r, g, b, line; };
  const style styles[] = {{0, 0, 0, 2}, {214, 39, 40, 1}, {31, 119, 180, 1}, {44, 160, 44, 1},
                          {255, 127, 14, 1}};
  for (std::size_t k = 0; k < methods.size(); ++k) {
    const auto& mr = methods[k];
    chart_series cs;
    cs.name = mr.name;
    cs.red = styles[k].r, cs.green = styles[k].g, cs.blue = styles[k].b;
    cs.line_style = styles[k].line;
    cs.ece = mean_std([&] {
               std::vector<double> v;
               for (const auto& e : mr.test) v.push_back(e.ece);
               return v;
             }()).mean;
    cs.bins = mr.test.front().bins;
    const std::size_t epochs = mr.epoch_accuracy.front().size();
    for (std::size_t e = 0; e < epochs; ++e) {
      double a = 0, n = 0;
      for (std::size_t s = 0; s < mr.epoch_accuracy.size(); ++s) {
        a += mr.epoch_accuracy[s][e];
        n += mr.epoch_nll[s][e];
      }
      cs.accuracy.push_back(a / static_cast<double>(mr.epoch_accuracy.size()));
      cs.nll.push_back(n / static_cast<double>(mr.epoch_nll.size()));
    }
    out.series.push_back(std::move(cs));
  }

  // the printed report
  std::string& r = out.report;
  char line[256];
  std::snprintf(line, sizeof line,
                "\nNoisy votes: %d simulated annotators per training image (class- and "
                "image-dependent confusion, see docs/cli.md), seed %llu\n",
                annotator_count, static_cast<unsigned long long>(config.seed));
  r += line;
  r += "annotator            1       2       3       4       5 (careless)\n";
  r += "accuracy      ";
  for (int a = 0; a < annotator_count; ++a) {
    std::snprintf(line, sizeof line, "%8.3f", 1 - sim.error_rate[a]);
    r += line;
  }
  r += "\nDS estimate   ";
  for (int a = 0; a < annotator_count; ++a) {
    std::snprintf(line, sizeof line, "%8.3f", ds.accuracy[a]);
    r += line;
  }
  r += "\nabstained     ";
  for (int a = 0; a < annotator_count; ++a) {
    std::snprintf(line, sizeof line, "%8.3f", sim.abstained[a]);
    r += line;
  }
  std::snprintf(line, sizeof line,
                "\ntraining labels vs the truth: majority vote %.4f, Dawid-Skene argmax %.4f "
                "(DS: %d iterations, %.2fs for majority + fractions + DS)\n",
                j["labels"]["majority"]["label_accuracy"].get<double>(),
                j["labels"]["dawid_skene"]["label_accuracy"].get<double>(), ds.iterations,
                aggregate_seconds);
  r += line;
  std::snprintf(line, sizeof line,
                "\nstudent %s trained on each target, %d seeds, %d epochs (mean +- std, test set; "
                "'ambiguous' = the %lld test images the ambiguity model ranks highest)\n",
                ("784-" + std::to_string(config.hidden.front()) + "-10").c_str(), config.seeds,
                config.epochs, static_cast<long long>(n_ambiguous));
  r += line;
  std::snprintf(line, sizeof line, "%-16s %-17s %-17s %-17s %-17s %-17s\n", "targets", "accuracy",
                "NLL", "ECE", "ambiguous acc.", "ambiguous NLL");
  r += line;
  for (const auto& mr : methods) {
    const auto& sj = j["students"][mr.name];
    const auto cell = [&](const char* key) {
      char c[32];
      std::snprintf(c, sizeof c, "%.4f +- %.4f", sj[key]["mean"].get<double>(),
                    sj[key]["std"].get<double>());
      return std::string(c);
    };
    std::snprintf(line, sizeof line, "%-16s %-17s %-17s %-17s %-17s %-17s\n", mr.name.c_str(),
                  cell("accuracy").c_str(), cell("nll").c_str(), cell("ece").c_str(),
                  cell("ambiguous_accuracy").c_str(), cell("ambiguous_nll").c_str());
    r += line;
  }
  std::snprintf(line, sizeof line, "(noisy scenario: %.1fs)\n",
                std::chrono::duration<double>(clock::now() - start).count());
  r += line;
  j["seconds"] = std::chrono::duration<double>(clock::now() - start).count();
  return out;
}

}  // namespace softce::cli
