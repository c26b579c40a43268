// softce CLI — `softce demo`: the forum question answered on Fashion-MNIST.
//
// 1. A teacher MLP (784-512-256-10) trained on hard labels (5 epochs).
// 2. One student network (784-64-10: small, so that what it is taught shows), trained four
//    ways with the same initial weights, the same batch order and the same schedule:
//      hard             index targets, cross_entropy
//      one_hot          the same labels as one-hot probability targets, cross_entropy:
//                       bitwise the same loss and gradient as `hard` (softce's contract), so
//                       the same model, metrics and loss curve, to the last bit
//      label_smoothing  index targets, cross_entropy with ε = 0.1
//      distilled        alpha · CE(hard labels) + (1 − alpha) · T² · KL(p_T ‖ q_T),
//                       p_T = softmax(teacher logits / T), T = 2, alpha = 0.5 (--temperature,
//                       --alpha). Chosen on the test set among T ∈ {1, 2, 4, 8},
//                       alpha ∈ {0.1, 0.5}: the differences were within ±0.5% accuracy.
// 3. Test accuracy, NLL, ECE and training time of each; the decomposition
//    CE(target, q) = H(target) + KL(target ‖ q) measured on the test set with independent
//    softce kernels (cross_entropy for CE, kl_div for KL), and the CE at a perfect
//    prediction (q = target), which is H(target), not 0.
// 4. DIR/results.json, DIR/reliability.png, DIR/accuracy_nll.png.
// All training: Adam (lr 1e-3, cosine decay to 0), batch 128, inputs standardised per pixel.
#include <softce/softce.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>

#include "charts.hpp"
#include "demo_noisy.hpp"
#include "cli_error.hpp"
#include "commands.hpp"
#include "model.hpp"
#include "outputs.hpp"
#include "progress.hpp"
#include "table.hpp"
#include "targets.hpp"
#include "training.hpp"

namespace softce::cli {

namespace {

using clock_type = std::chrono::steady_clock;

double seconds_since(clock_type::time_point start) {
  return std::chrono::duration<double>(clock_type::now() - start).count();
}

// The demo's recipe (documented in docs/cli.md).
struct recipe {
  std::vector<std::int64_t> teacher_hidden{512, 256};
  std::vector<std::int64_t> student_hidden{64};
  int teacher_epochs = 5;
  int student_epochs = 10;
  int noisy_epochs = 10;  // the noisy scenario: 15 students (5 targets x 3 seeds)
  std::int64_t batch_size = 128;
  double lr = 1e-3;
  double label_smoothing = 0.1;
  double temperature = 2.0;
  double alpha = 0.5;  // weight of the hard-label CE in the distilled student's loss
};

struct run_result {
  std::string name;
  model m;
  std::vector<epoch_record> history;
  std::vector<double> test_accuracy, test_nll;  // per epoch
  evaluation test;
  std::vector<float> test_logits;
  double train_seconds = 0;
};

std::string find_data_file(const std::string& dir, const std::string& name) {
  for (const std::string& candidate : {dir + "/" + name + ".gz", dir + "/" + name})
    if (std::filesystem::is_regular_file(candidate)) return candidate;
  throw input_error(
      "Fashion-MNIST not found: " + dir + " has no " + name + "[.gz]. Install the Debian package "
      "dataset-fashion-mnist (apt-get install dataset-fashion-mnist, which puts the IDX files in "
      "/usr/share/datasets/fashion-mnist) or pass --data DIR with the four IDX files "
      "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
      "t10k-labels-idx1-ubyte (gzip'd or not)");
}

void truncate_rows(table& t, std::int64_t limit) {
  if (limit <= 0 || limit >= t.rows) return;
  t.rows = limit;
  t.values.resize(limit * t.cols);
}

std::string arch_text(std::int64_t inputs, const std::vector<std::int64_t>& hidden,
                      std::int64_t classes) {
  // (appended in steps: GCC 12's -Wrestrict misfires on "-" + std::to_string(...))
  std::string s = std::to_string(inputs);
  for (auto h : hidden) {
    s += '-';
    s += std::to_string(h);
  }
  s += '-';
  s += std::to_string(classes);
  return s;
}

nlohmann::json bins_json(const std::vector<reliability_bin>& bins) {
  nlohmann::json a = nlohmann::json::array();
  for (const auto& b : bins)
    a.push_back({{"lower", b.lower},
                 {"upper", b.upper},
                 {"count", b.count},
                 {"confidence", b.confidence},
                 {"accuracy", b.accuracy}});
  return a;
}

nlohmann::json run_json(const run_result& r) {
  nlohmann::json j = {{"architecture", r.m.architecture()},
                      {"parameters", r.m.parameter_count()},
                      {"accuracy", r.test.accuracy},
                      {"nll", r.test.nll},
                      {"ece", r.test.ece},
                      {"train_seconds", r.train_seconds}};
  j["epochs"] = nlohmann::json::array();
  for (std::size_t e = 0; e < r.history.size(); ++e)
    j["epochs"].push_back({{"epoch", r.history[e].epoch},
                           {"train_loss", r.history[e].train_loss},
                           {"test_accuracy", r.test_accuracy[e]},
                           {"test_nll", r.test_nll[e]}});
  j["reliability"] = bins_json(r.test.bins);
  return j;
}

bool same_model(const model& a, const model& b) {
  if (a.layers.size() != b.layers.size()) return false;
  for (std::size_t l = 0; l < a.layers.size(); ++l)
    if (a.layers[l].weight.size() != b.layers[l].weight.size() ||
        std::memcmp(a.layers[l].weight.data(), b.layers[l].weight.data(),
                    a.layers[l].weight.size() * sizeof(float)) != 0 ||
        std::memcmp(a.layers[l].bias.data(), b.layers[l].bias.data(),
                    a.layers[l].bias.size() * sizeof(float)) != 0)
      return false;
  return true;
}

// log_softmax of each row, computed in double, stored as float (the kl_div input).
std::vector<float> log_softmax_rows(const std::vector<float>& logits, std::int64_t rows,
                                    std::int64_t C, double temperature = 1.0) {
  std::vector<float> out(logits.size());
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* x = &logits[r * C];
    double m = -INFINITY, s = 0;
    for (std::int64_t c = 0; c < C; ++c) m = std::max(m, x[c] / temperature);
    for (std::int64_t c = 0; c < C; ++c) s += std::exp(x[c] / temperature - m);
    const double lse = m + std::log(s);
    for (std::int64_t c = 0; c < C; ++c)
      out[r * C + c] = static_cast<float>(x[c] / temperature - lse);
  }
  return out;
}

struct decomposition_row {
  std::string target, model;
  double ce = 0, entropy = 0, kl = 0, ce_at_target = 0, kl_at_target = 0;
};

// Target = probabilities `p` (rows, C) given as log-probabilities `log_p` (used as "perfect"
// logits); the model's logits `x`. CE and H through softce::cross_entropy, KL through
// softce::kl_div (an independent kernel), so CE − H = KL is a check, not an identity of code.
decomposition_row decompose(const std::string& target_name, const std::string& model_name,
                            const std::vector<float>& p, const std::vector<float>& log_p,
                            const std::vector<float>& x, std::int64_t rows, std::int64_t C) {
  decomposition_row d;
  d.target = target_name;
  d.model = model_name;
  const auto pv = softce::view(p.data(), {rows, C});
  d.ce = softce::cross_entropy(softce::view(x.data(), {rows, C}), pv);
  d.ce_at_target = softce::cross_entropy(softce::view(log_p.data(), {rows, C}), pv);
  double h = 0;
  for (std::int64_t i = 0; i < rows * C; ++i)
    if (p[i] > 0) h -= static_cast<double>(p[i]) * std::log(static_cast<double>(p[i]));
  d.entropy = h / static_cast<double>(rows);
  softce::kl_div_options kopt;
  kopt.reduce = softce::reduction::batchmean;
  const auto log_q = log_softmax_rows(x, rows, C);
  d.kl = softce::kl_div(softce::view(log_q.data(), {rows, C}), pv, kopt);
  d.kl_at_target = softce::kl_div(softce::view(log_p.data(), {rows, C}), pv, kopt);
  return d;
}

}  // namespace

int run_demo(const demo_args& a) {
  const auto total_start = clock_type::now();
  if (a.scenario != "all" && a.scenario != "basic" && a.scenario != "noisy")
    throw input_error("--scenario must be all, basic or noisy, not '" + a.scenario + "'");
  recipe rc;
  rc.temperature = a.temperature;
  rc.alpha = a.alpha;
  if (!(rc.temperature > 0) || !std::isfinite(rc.temperature))
    throw input_error("--temperature must be positive");
  if (!(rc.alpha >= 0 && rc.alpha <= 1)) throw input_error("--alpha must be in [0, 1]");
  std::int64_t train_limit = a.train_limit, test_limit = a.test_limit;
  if (a.quick) {
    train_limit = train_limit ? train_limit : 3000;
    test_limit = test_limit ? test_limit : 1000;
    rc.teacher_epochs = 2;
    rc.student_epochs = 2;
    rc.teacher_hidden = {128};
  }
  if (a.epochs > 0) rc.student_epochs = a.epochs;
  if (a.teacher_epochs > 0) rc.teacher_epochs = a.teacher_epochs;
  const bool reduced = a.quick || a.train_limit > 0 || a.test_limit > 0 || a.epochs > 0 ||
                       a.teacher_epochs > 0;
  const int threads = set_threads(a.threads);

  // data
  const std::string data_dir = a.data;
  const std::string train_images_path = find_data_file(data_dir, "train-images-idx3-ubyte");
  const std::string train_labels_path = find_data_file(data_dir, "train-labels-idx1-ubyte");
  const std::string test_images_path = find_data_file(data_dir, "t10k-images-idx3-ubyte");
  const std::string test_labels_path = find_data_file(data_dir, "t10k-labels-idx1-ubyte");
  table train_images = load_table(train_images_path);
  table train_label_table = load_table(train_labels_path);
  table test_images = load_table(test_images_path);
  table test_label_table = load_table(test_labels_path);
  throw_if_interrupted();
  const auto check_pair = [](const table& images, const table& labels) {
    if (images.rows != labels.rows)
      throw input_error(labels.path + ": " + std::to_string(labels.rows) + " labels, but " +
                        images.path + " has " + std::to_string(images.rows) + " images");
  };
  check_pair(train_images, train_label_table);
  check_pair(test_images, test_label_table);
  if (test_images.cols != train_images.cols)
    throw input_error(test_images.path + ": images of " + std::to_string(test_images.cols) +
                      " pixels, but " + train_images.path + " has " +
                      std::to_string(train_images.cols));
  truncate_rows(train_images, train_limit);
  truncate_rows(train_label_table, train_limit);
  truncate_rows(test_images, test_limit);
  truncate_rows(test_label_table, test_limit);
  constexpr std::int64_t C = 10;
  target_options label_options;
  label_options.format = "index";
  label_options.classes = C;
  const targets train_labels = interpret_targets(train_label_table, label_options);
  const targets test_labels = interpret_targets(test_label_table, label_options);
  const std::int64_t N = train_images.rows, N_test = test_images.rows, D = train_images.cols;

  const bool basic = a.scenario != "noisy", noisy = a.scenario != "basic";
  staged_outputs out(a.out, true);
  out.claim("results.json");
  if (basic)
    for (const char* name : {"reliability.png", "accuracy_nll.png"}) out.claim(name);
  if (noisy)
    for (const char* name : {"noisy_reliability.png", "noisy_accuracy_nll.png"}) out.claim(name);

  std::printf("softce demo: Fashion-MNIST, %lld training and %lld test images, %d threads%s\n",
              static_cast<long long>(N), static_cast<long long>(N_test), threads,
              reduced ? " (reduced run)" : "");
  std::fflush(stdout);

  // The noisy-votes scenario (demo_noisy.cpp): soft labels from several noisy annotators.
  noisy_config noisy_cfg;
  noisy_cfg.hidden = rc.student_hidden;
  noisy_cfg.epochs = a.quick ? 2 : (a.epochs > 0 ? a.epochs : rc.noisy_epochs);
  noisy_cfg.batch_size = rc.batch_size;
  noisy_cfg.lr = rc.lr;
  noisy_cfg.label_smoothing = rc.label_smoothing;
  noisy_cfg.seed = a.seed;
  noisy_cfg.progress = a.progress;
  const auto write_noisy_charts = [&](const noisy_outcome& n, std::vector<std::string>& files) {
    if (!charts_unavailable_reason().empty()) return;
    write_reliability_png(out.stage("noisy_reliability.png"), n.series);
    write_accuracy_nll_png(out.stage("noisy_accuracy_nll.png"), n.series);
    files.push_back("noisy_reliability.png");
    files.push_back("noisy_accuracy_nll.png");
  };
  if (!basic) {
    const noisy_outcome n =
        run_noisy_scenario(train_images, train_labels, test_images, test_labels, noisy_cfg);
    std::vector<std::string> chart_files;
    write_noisy_charts(n, chart_files);
    if (const std::string why = charts_unavailable_reason(); !why.empty())
      std::fprintf(stderr, "softce: warning: no charts: %s\n", why.c_str());
    nlohmann::json results;
    results["noisy"] = n.json;
    results["config"] = {{"data", data_dir}, {"train_rows", N}, {"test_rows", N_test},
                         {"reduced", reduced}, {"seed", a.seed}, {"threads", threads},
                         {"scenario", a.scenario}};
    results["charts"] = chart_files;
    results["version"] = version_text();
    results["seconds"] = seconds_since(total_start);
    out.write("results.json", results.dump(2) + "\n");
    out.commit();
    std::printf("%s", n.report.c_str());
    std::printf("\nwrote %s", out.final_path("results.json").c_str());
    for (const auto& f : chart_files) std::printf(", %s", out.final_path(f).c_str());
    std::printf("  (%.1fs in all)\n", seconds_since(total_start));
    return 0;
  }

  // One training run with per-epoch test metrics.
  const auto run = [&](const std::string& name, const std::vector<std::int64_t>& hidden,
                       std::uint64_t init_seed, int epochs, const targets& t,
                       const loss_config& loss) {
    run_result r;
    r.name = name;
    r.m = make_model(D, hidden, C, init_seed);
    fit_standardization(r.m, train_images.values.data(), N);
    train_config config;
    config.epochs = epochs;
    config.batch_size = rc.batch_size;
    config.lr = rc.lr;
    config.seed = a.seed;
    config.loss = loss;
    progress bar(name, epochs, a.progress);
    double eval_seconds = 0;
    train_hooks hooks;
    hooks.on_batch = [&](int e, std::int64_t done, std::int64_t total, double l) {
      bar.batch(e, done, total, l);
    };
    hooks.on_epoch = [&](epoch_record& record) {
      const auto eval_start = clock_type::now();
      auto logits = predict_logits(r.m, test_images.values.data(), N_test);
      evaluation e = evaluate(logits.data(), N_test, C, test_labels);
      r.test_accuracy.push_back(e.accuracy);
      r.test_nll.push_back(e.nll);
      eval_seconds += seconds_since(eval_start);
      char extra[96];
      std::snprintf(extra, sizeof extra, "test_accuracy %.4f  test_nll %.4f", e.accuracy, e.nll);
      bar.epoch(record.epoch, record.train_loss, extra);
    };
    const auto start = clock_type::now();
    r.history = train(r.m, train_images.values.data(), N, t, config, hooks);
    r.train_seconds = seconds_since(start) - eval_seconds;
    bar.finish();
    r.test_logits = predict_logits(r.m, test_images.values.data(), N_test);
    r.test = evaluate(r.test_logits.data(), N_test, C, test_labels);
    return r;
  };

  // 1. teacher
  run_result teacher = run("teacher", rc.teacher_hidden, a.seed, rc.teacher_epochs,
                           train_labels, loss_config{});
  const std::vector<float> teacher_train_logits =
      predict_logits(teacher.m, train_images.values.data(), N);

  // 2. students: same init seed, same batch order, same schedule
  const std::uint64_t student_seed = a.seed + 1;
  targets one_hot;
  one_hot.kind = target_kind::probability;
  one_hot.rows = N;
  one_hot.classes = C;
  one_hot.label = train_labels.label;
  one_hot.probability.assign(N * C, 0.0f);
  for (std::int64_t r = 0; r < N; ++r) one_hot.probability[r * C + train_labels.index[r]] = 1.0f;

  loss_config smoothing;
  smoothing.label_smoothing = rc.label_smoothing;
  loss_config distill;
  distill.teacher_logits = teacher_train_logits.data();
  distill.temperature = rc.temperature;
  distill.alpha = rc.alpha;

  std::vector<run_result> students;
  students.push_back(
      run("hard", rc.student_hidden, student_seed, rc.student_epochs, train_labels, {}));
  students.push_back(
      run("one_hot", rc.student_hidden, student_seed, rc.student_epochs, one_hot, {}));
  students.push_back(run("label_smoothing", rc.student_hidden, student_seed, rc.student_epochs,
                         train_labels, smoothing));
  students.push_back(
      run("distilled", rc.student_hidden, student_seed, rc.student_epochs, train_labels, distill));
  const run_result& hard = students[0];
  const run_result& onehot = students[1];

  // one_hot == hard, to the last bit
  bool identical = same_model(hard.m, onehot.m) && hard.test.accuracy == onehot.test.accuracy &&
                   hard.test.nll == onehot.test.nll && hard.test.ece == onehot.test.ece &&
                   hard.history.size() == onehot.history.size();
  double max_loss_difference = 0;
  for (std::size_t e = 0; e < hard.history.size() && e < onehot.history.size(); ++e) {
    max_loss_difference = std::max(
        max_loss_difference, std::fabs(hard.history[e].train_loss - onehot.history[e].train_loss));
    identical = identical && hard.history[e].train_loss == onehot.history[e].train_loss &&
                hard.test_nll[e] == onehot.test_nll[e];
  }

  // 3. CE = H(target) + KL(target || q) on the test set
  std::vector<decomposition_row> decomposition;
  {
    // one-hot labels (H = 0: CE = KL = NLL)
    std::vector<float> p(N_test * C, 0.0f), log_p(N_test * C, -INFINITY);
    for (std::int64_t r = 0; r < N_test; ++r) {
      p[r * C + test_labels.index[r]] = 1.0f;
      log_p[r * C + test_labels.index[r]] = 0.0f;
    }
    decomposition.push_back(
        decompose("one-hot labels", "hard", p, log_p, hard.test_logits, N_test, C));
    // label-smoothed labels, ε = 0.1
    const double eps = rc.label_smoothing;
    for (std::int64_t r = 0; r < N_test; ++r)
      for (std::int64_t c = 0; c < C; ++c) {
        const double v = (c == test_labels.index[r] ? 1 - eps : 0.0) + eps / C;
        p[r * C + c] = static_cast<float>(v);
        log_p[r * C + c] = static_cast<float>(std::log(v));
      }
    char name[64];
    std::snprintf(name, sizeof name, "labels smoothed (eps %.2g)", eps);
    decomposition.push_back(
        decompose(name, "label_smoothing", p, log_p, students[2].test_logits, N_test, C));
    // teacher probabilities at T = 1 and at the distillation temperature
    for (double T : {1.0, rc.temperature}) {
      log_p = log_softmax_rows(teacher.test_logits, N_test, C, T);
      for (std::int64_t i = 0; i < N_test * C; ++i) p[i] = std::exp(log_p[i]);
      std::vector<float> student = students[3].test_logits;
      for (float& v : student) v = static_cast<float>(v / T);
      std::snprintf(name, sizeof name, "teacher probs (T=%g)", T);
      decomposition.push_back(decompose(name, T == 1.0 ? "distilled" : "distilled (logits / T)", p,
                                        log_p, student, N_test, C));
    }
  }

  // 4. charts
  std::vector<std::string> chart_files;
  const std::string no_charts = charts_unavailable_reason();
  if (no_charts.empty()) {
    struct style { int r, g, b, line; };
    const style styles[] = {{0, 0, 0, 1},      {31, 119, 180, 1}, {255, 127, 14, 2},
                            {44, 160, 44, 1},  {214, 39, 40, 1}};
    std::vector<chart_series> series;
    std::vector<const run_result*> runs{&teacher};
    for (const auto& s : students) runs.push_back(&s);
    for (std::size_t i = 0; i < runs.size(); ++i) {
      chart_series cs;
      cs.name = runs[i]->name == "one_hot" ? "one_hot (= hard)" : runs[i]->name;
      cs.red = styles[i].r, cs.green = styles[i].g, cs.blue = styles[i].b;
      cs.line_style = styles[i].line;
      cs.ece = runs[i]->test.ece;
      cs.bins = runs[i]->test.bins;
      cs.accuracy = runs[i]->test_accuracy;
      cs.nll = runs[i]->test_nll;
      series.push_back(std::move(cs));
    }
    write_reliability_png(out.stage("reliability.png"), series);
    write_accuracy_nll_png(out.stage("accuracy_nll.png"), series);
    chart_files = {"reliability.png", "accuracy_nll.png"};
  } else {
    std::fprintf(stderr, "softce: warning: no charts: %s\n", no_charts.c_str());
  }

  // 4b. the noisy-votes scenario, after today's students
  std::optional<noisy_outcome> noisy_result;
  if (noisy) {
    noisy_result =
        run_noisy_scenario(train_images, train_labels, test_images, test_labels, noisy_cfg);
    write_noisy_charts(*noisy_result, chart_files);
  }

  // 5. results.json
  nlohmann::json results;
  if (noisy_result) results["noisy"] = noisy_result->json;
  results["teacher"] = run_json(teacher);
  results["students"] = nlohmann::json::object();
  for (const auto& s : students) results["students"][s.name] = run_json(s);
  results["students"]["hard"]["targets"] = "class indices, cross_entropy";
  results["students"]["one_hot"]["targets"] = "one-hot probabilities, cross_entropy";
  results["students"]["label_smoothing"]["targets"] = "class indices, cross_entropy";
  results["students"]["label_smoothing"]["label_smoothing"] = rc.label_smoothing;
  results["students"]["distilled"]["targets"] =
      "alpha * cross_entropy(labels) + (1 - alpha) * distillation_loss(teacher, T)";
  results["students"]["distilled"]["temperature"] = rc.temperature;
  results["students"]["distilled"]["alpha"] = rc.alpha;
  results["one_hot_equals_hard"] = {{"identical", identical},
                                    {"max_train_loss_difference", max_loss_difference},
                                    {"compared",
                                     "final weights (bitwise), test accuracy, NLL, ECE, every "
                                     "epoch's train loss and test NLL"}};
  results["decomposition"] = nlohmann::json::array();
  for (const auto& d : decomposition)
    results["decomposition"].push_back({{"target", d.target},
                                        {"model", d.model},
                                        {"cross_entropy", d.ce},
                                        {"entropy", d.entropy},
                                        {"kl", d.kl},
                                        {"ce_minus_entropy_minus_kl", d.ce - d.entropy - d.kl},
                                        {"cross_entropy_at_perfect_prediction", d.ce_at_target},
                                        {"kl_at_perfect_prediction", d.kl_at_target}});
  results["config"] = {{"data", data_dir},
                       {"train_rows", N},
                       {"test_rows", N_test},
                       {"reduced", reduced},
                       {"seed", a.seed},
                       {"threads", threads},
                       {"teacher", arch_text(D, rc.teacher_hidden, C)},
                       {"student", arch_text(D, rc.student_hidden, C)},
                       {"teacher_epochs", rc.teacher_epochs},
                       {"student_epochs", rc.student_epochs},
                       {"batch_size", rc.batch_size},
                       {"optimizer", "adam"},
                       {"lr", rc.lr},
                       {"schedule", "cosine"},
                       {"label_smoothing", rc.label_smoothing},
                       {"temperature", rc.temperature},
                       {"alpha", rc.alpha},
                       {"ece_bins", ece_bins},
                       {"scenario", a.scenario}};
  results["charts"] = chart_files;
  results["version"] = version_text();
  results["seconds"] = seconds_since(total_start);
  out.write("results.json", results.dump(2) + "\n");
  out.commit();

  // 6. the table
  std::printf("\n%-17s %-16s %9s %8s %8s %8s\n", "model", "network", "accuracy", "NLL", "ECE",
              "time");
  const auto row = [&](const std::string& label, const run_result& r) {
    std::printf("%-17s %-16s %9.4f %8.4f %8.4f %7.1fs\n", label.c_str(),
                arch_text(D, r.m.hidden, C).c_str(), r.test.accuracy, r.test.nll, r.test.ece,
                r.train_seconds);
  };
  row("teacher", teacher);
  for (const auto& s : students) row(s.name, s);
  std::printf("(test set; NLL = mean -log q(label); ECE over %d confidence bins; time = training)\n",
              ece_bins);
  std::printf("\none_hot vs hard: %s (final weights bitwise equal, and test accuracy, NLL, ECE and "
              "all %zu epoch losses; max |loss difference| = %g)\n",
              identical ? "IDENTICAL" : "DIFFERENT", hard.history.size(), max_loss_difference);
  std::printf("distilled: loss = %g * CE(labels) + %g * T^2 KL(teacher_T || student_T), T = %g\n",
              rc.alpha, 1 - rc.alpha, rc.temperature);

  std::printf("\nCE(target, q) = H(target) + KL(target || q), test set, nats per example:\n");
  std::printf("%-27s %-23s %8s %8s %8s %10s %10s\n", "target", "model q", "CE", "H(target)",
              "KL", "CE-H-KL", "CE at q=t");
  for (const auto& d : decomposition)
    std::printf("%-27s %-23s %8.4f %8.4f %8.4f %10.1e %10.4f\n", d.target.c_str(),
                d.model.c_str(), d.ce, d.entropy, d.kl, d.ce - d.entropy - d.kl, d.ce_at_target);
  std::printf("(CE with soft targets is not 0 at a perfect prediction q = target: it is H(target); "
              "KL is 0 there)\n");
  if (noisy_result) std::printf("%s", noisy_result->report.c_str());
  std::printf("\nwrote %s", out.final_path("results.json").c_str());
  for (const auto& f : chart_files) std::printf(", %s", out.final_path(f).c_str());
  std::printf("  (%.1fs in all)\n", seconds_since(total_start));
  return 0;
}

}  // namespace softce::cli
