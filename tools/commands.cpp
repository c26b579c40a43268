// softce CLI — `train`, `predict` and `check-targets`.
//
// Order of work in every command: read and validate ALL inputs (sizes against limits.hpp),
// then create/probe the output location and check that every output name is free or a
// regular file, then compute (non-finite numbers are errors), then write outputs under
// temporary names and rename them into place all or nothing. So bad input costs nothing and
// leaves nothing, and an unwritable --out is reported before any training.
#include "commands.hpp"

#include "blas.hpp"
#include <softce/softce.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <thread>

#include "charts.hpp"
#include "cli_error.hpp"
#include "limits.hpp"
#include "model.hpp"
#include "outputs.hpp"
#include "progress.hpp"
#include "table.hpp"
#include "targets.hpp"
#include "training.hpp"

#ifndef SOFTCE_VERSION
#define SOFTCE_VERSION "unknown"
#endif

namespace softce::cli {

int set_threads(int threads) {
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  softce::detail::blas::set_num_threads("softce", threads);
  softce::set_num_threads(threads);
  return threads;
}

std::string version_text() {
  std::string blas;
  try {
    blas = softce::detail::blas::describe("softce --version");
  } catch (const std::exception& e) {
    blas = std::string("no BLAS: ") + e.what();
  }
  return std::string("softce ") + SOFTCE_VERSION + " (SIMD target " + softce::simd_target() +
         ", " + blas + ", charts: " + plotting_library_version() + ")";
}

namespace {

nlohmann::json to_json(const evaluation& e) {
  return {{"rows", e.rows},
          {"accuracy", e.accuracy},
          {"nll", e.nll},
          {"ece", e.ece},
          {"cross_entropy", e.cross_entropy}};
}

std::string columns(std::int64_t n) { return std::to_string(n) + (n == 1 ? " column" : " columns"); }

void require_rows(const table& a, const table& b) {
  if (a.rows != b.rows)
    throw input_error(a.path + ": " + std::to_string(a.rows) + " rows, but " + b.path + " has " +
                      std::to_string(b.rows) + " (one row per feature row is needed)");
}

void require_positive(double v, const char* option) {
  if (!(v > 0) || !std::isfinite(v))
    throw input_error(std::string(option) + " must be positive");
}

// Softmax of each row, in double.
std::vector<float> softmax_rows(const std::vector<float>& logits, std::int64_t rows,
                                std::int64_t C) {
  std::vector<float> p(logits.size());
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* x = &logits[r * C];
    double m = x[0], s = 0;
    for (std::int64_t c = 1; c < C; ++c) m = std::max<double>(m, x[c]);
    for (std::int64_t c = 0; c < C; ++c) s += std::exp(x[c] - m);
    for (std::int64_t c = 0; c < C; ++c) p[r * C + c] = static_cast<float>(std::exp(x[c] - m) / s);
  }
  return p;
}

// input_error unless logits (rows, C) for the rows of `t` stay within max_table_values.
void require_logits_fit(const table& t, std::int64_t C) {
  if (t.rows > max_table_values / C)
    throw input_error(t.path + ": " + std::to_string(t.rows) + " rows x " + std::to_string(C) +
                      " classes of outputs exceed the limit of " +
                      std::to_string(max_table_values) + " values");
}

// The first row whose logits are not all finite, or -1.
std::int64_t first_nonfinite_row(const std::vector<float>& logits, std::int64_t C) {
  const std::int64_t rows = static_cast<std::int64_t>(logits.size()) / C;
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < C; ++c)
      if (!std::isfinite(logits[r * C + c])) return r;
  return -1;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// train

int run_train(const train_args& a) {
  // arguments
  const std::vector<std::int64_t> hidden = parse_architecture(a.architecture);
  if (a.loss != "cross_entropy" && a.loss != "kl")
    throw input_error("--loss must be cross_entropy or kl, not '" + a.loss + "'");
  if (a.schedule != "cosine" && a.schedule != "constant")
    throw input_error("--schedule must be cosine or constant, not '" + a.schedule + "'");
  if (a.epochs < 1) throw input_error("--epochs must be at least 1");
  if (a.batch_size < 1) throw input_error("--batch-size must be at least 1");
  require_positive(a.lr, "--lr");
  require_positive(a.temperature, "--temperature");
  if (!(a.label_smoothing >= 0 && a.label_smoothing <= 1))
    throw input_error("--label-smoothing must be in [0, 1]");
  if (!(a.alpha >= 0 && a.alpha <= 1)) throw input_error("--alpha must be in [0, 1]");
  if (!(a.tolerance >= 0)) throw input_error("--tolerance must be non-negative");
  if (a.val_features.empty() != a.val_targets.empty())
    throw input_error("--val-features and --val-targets go together");
  const int threads = set_threads(a.threads);

  // inputs
  table features = load_table(a.features);
  throw_if_interrupted();
  table target_table = load_table(a.targets);
  require_rows(target_table, features);
  target_options topt;
  topt.format = a.targets_format;
  topt.classes = a.classes;
  topt.normalize = a.normalize;
  topt.tolerance = a.tolerance;
  targets train_targets = interpret_targets(target_table, topt);
  const std::int64_t C = train_targets.classes;
  require_logits_fit(features, C);
  check_model_size(features.cols, hidden, C, std::min<std::int64_t>(a.batch_size, features.rows));
  if (a.topk_tail && train_targets.kind != target_kind::topk)
    throw input_error("--topk-tail needs top-k targets (--targets-format topk)");
  if (a.topk_tail && a.label_smoothing > 0)
    throw input_error("--topk-tail cannot be combined with --label-smoothing");

  table val_features, val_target_table;
  targets val_targets;
  const bool have_val = !a.val_features.empty();
  if (have_val) {
    val_features = load_table(a.val_features);
    val_target_table = load_table(a.val_targets);
    if (val_features.cols != features.cols)
      throw input_error(val_features.path + ": " + columns(val_features.cols) + ", but " +
                        features.path + " has " + std::to_string(features.cols));
    require_rows(val_target_table, val_features);
    target_options vopt = topt;
    vopt.classes = C;
    if (resolve_kind(val_target_table, vopt) == target_kind::probability &&
        val_target_table.cols != C)
      throw input_error(val_target_table.path + ": " + columns(val_target_table.cols) +
                        " (classes), but the training targets have " + std::to_string(C) +
                        " classes");
    val_targets = interpret_targets(val_target_table, vopt);
    require_logits_fit(val_features, C);
  }

  table teacher;
  if (!a.teacher_logits.empty()) {
    teacher = load_table(a.teacher_logits);
    require_rows(teacher, features);
    if (teacher.cols != C)
      throw input_error(teacher.path + ": " + columns(teacher.cols) +
                        " (teacher logits), but the targets have " + std::to_string(C) +
                        " classes");
  }

  // output location (created and probed before training)
  staged_outputs out(a.out, true);
  out.claim("model.json");
  out.claim("metrics.json");

  // train
  model m = make_model(features.cols, hidden, C, a.seed);
  fit_standardization(m, features.values.data(), features.rows);
  train_config config;
  config.epochs = a.epochs;
  config.batch_size = a.batch_size;
  config.lr = a.lr;
  config.cosine = a.schedule == "cosine";
  config.seed = a.seed;
  config.loss.kl_objective = a.loss == "kl";
  config.loss.label_smoothing = a.label_smoothing;
  config.loss.topk_tail = a.topk_tail;
  if (!teacher.values.empty()) {
    config.loss.teacher_logits = teacher.values.data();
    config.loss.temperature = a.temperature;
    config.loss.alpha = a.alpha;
  }
  progress bar("train", a.epochs, a.progress);
  train_hooks hooks;
  hooks.on_batch = [&](int e, std::int64_t done, std::int64_t total, double loss) {
    bar.batch(e, done, total, loss);
  };
  hooks.on_epoch = [&](epoch_record& r) {
    std::string extra;
    if (have_val) {
      auto logits = predict_logits(m, val_features.values.data(), val_features.rows);
      if (const std::int64_t row = first_nonfinite_row(logits, C); row >= 0)
        throw input_error(val_features.where(row) + ": the model's logits overflow float32 "
                          "(inf or NaN) for this validation row after epoch " +
                          std::to_string(r.epoch) + ": its features are far outside the "
                          "range of the training features (nothing was written)");
      r.validation = evaluate(logits.data(), val_features.rows, C, val_targets);
      char buffer[96];
      std::snprintf(buffer, sizeof buffer, "val_accuracy %.4f  val_nll %.4f",
                    r.validation->accuracy, r.validation->nll);
      extra = buffer;
    }
    bar.epoch(r.epoch, r.train_loss, extra);
  };
  const auto start = std::chrono::steady_clock::now();
  std::vector<epoch_record> history =
      train(m, features.values.data(), features.rows, train_targets, config, hooks);
  bar.finish();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  // metrics
  nlohmann::json metrics;
  metrics["model"] = "model.json";
  metrics["architecture"] = m.architecture();
  metrics["parameters"] = m.parameter_count();
  metrics["inputs"] = m.inputs;
  metrics["classes"] = C;
  metrics["train_rows"] = features.rows;
  metrics["targets"] = kind_name(train_targets.kind);
  nlohmann::json cfg = {{"features", a.features},
                        {"targets", a.targets},
                        {"loss", a.loss},
                        {"label_smoothing", a.label_smoothing},
                        {"epochs", a.epochs},
                        {"batch_size", a.batch_size},
                        {"lr", a.lr},
                        {"schedule", a.schedule},
                        {"optimizer", "adam"},
                        {"seed", a.seed},
                        {"threads", threads}};
  if (!a.teacher_logits.empty()) {
    cfg["teacher_logits"] = a.teacher_logits;
    cfg["temperature"] = a.temperature;
    cfg["alpha"] = a.alpha;
  }
  metrics["config"] = cfg;
  metrics["epochs"] = nlohmann::json::array();
  for (const auto& r : history) {
    nlohmann::json e = {{"epoch", r.epoch}, {"train_loss", r.train_loss}, {"seconds", r.seconds}};
    if (r.validation) e["validation"] = to_json(*r.validation);
    metrics["epochs"].push_back(e);
  }
  {
    auto logits = predict_logits(m, features.values.data(), features.rows);
    if (const std::int64_t r = first_nonfinite_row(logits, C); r >= 0)
      throw input_error("training diverged: the trained model's logits overflow float32 at " +
                        features.where(r) + "; lower --lr or rescale the inputs (nothing was "
                        "written)");
    metrics["train"] = to_json(evaluate(logits.data(), features.rows, C, train_targets));
  }
  if (have_val) metrics["validation"] = to_json(*history.back().validation);
  metrics["seconds"] = seconds;

  out.write("model.json", model_to_json(m, cfg.dump()));
  out.write("metrics.json", metrics.dump(2) + "\n");
  out.commit();
  std::fprintf(stderr, "wrote %s and %s\n", out.final_path("model.json").c_str(),
               out.final_path("metrics.json").c_str());
  return 0;
}

// ---------------------------------------------------------------------------------------
// predict

int run_predict(const predict_args& a) {
  if (a.output != "probs" && a.output != "logits")
    throw input_error("--output must be probs or logits, not '" + a.output + "'");
  set_threads(a.threads);
  std::string model_path = a.model;
  if (std::filesystem::is_directory(model_path)) model_path += "/model.json";
  model m = load_model(model_path);
  table features = load_table(a.features);
  if (features.cols != m.inputs)
    throw input_error(features.path + ": " + columns(features.cols) + ", but the model " +
                      model_path + " takes " + std::to_string(m.inputs) + " features");
  require_logits_fit(features, m.classes);
  if (std::filesystem::is_directory(a.out))
    throw input_error(a.out + ": is a directory (--out names the output file)");
  require_replaceable(a.out);
  const std::filesystem::path out_path(a.out);
  staged_outputs out(out_path.parent_path().string(), false);
  const std::string name = out_path.filename().string();
  if (name.empty()) throw input_error(a.out + ": --out must name a file");

  std::vector<float> result = predict_logits(m, features.values.data(), features.rows);
  if (const std::int64_t r = first_nonfinite_row(result, m.classes); r >= 0)
    throw input_error(features.where(r) + ": the model's logits overflow float32 (inf or NaN) "
                      "for this row: its features are far outside the range the model was "
                      "trained on (nothing was written)");
  if (a.output == "probs") result = softmax_rows(result, features.rows, m.classes);
  std::string lower = name;
  for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  out.write(name, ends_with(lower, ".npy") ? npy_bytes(result.data(), features.rows, m.classes)
                                           : csv_bytes(result.data(), features.rows, m.classes));
  out.commit();
  return 0;
}

// ---------------------------------------------------------------------------------------
// check-targets

int run_check_targets(const check_targets_args& a) {
  read_options ro;
  ro.allow_nonfinite = true;  // report NaN/Inf rows with the rest
  table t = load_table(a.file, ro);
  target_options topt;
  topt.format = a.targets_format;
  topt.classes = a.classes;
  topt.normalize = a.normalize;
  topt.tolerance = a.tolerance;
  std::int64_t count = 0;
  const auto problems = find_target_problems(t, topt, a.max_report, &count);
  const target_kind kind = resolve_kind(t, topt);
  if (count == 0) {
    targets tg = interpret_targets(t, topt);
    std::printf("%s: OK: %lld rows of %s, %lld classes\n", a.file.c_str(),
                static_cast<long long>(t.rows), kind_name(kind),
                static_cast<long long>(tg.classes));
    return 0;
  }
  for (const auto& p : problems) std::printf("%s\n", p.message.c_str());
  if (count > a.max_report)
    std::printf("... and %lld more\n", static_cast<long long>(count - a.max_report));
  std::fflush(stdout);
  throw input_error(a.file + ": " + std::to_string(count) + " of " +
                    std::to_string(t.rows) + " rows are not valid " + kind_name(kind));
}

}  // namespace softce::cli
