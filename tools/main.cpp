// softce — command-line program: train and compare classifiers on soft labels.
//
//   softce demo           Fashion-MNIST: teacher, then one student four ways (hard, one-hot,
//                         label smoothing, distilled); table, CE = H + KL, results.json, PNGs
//   softce train          train a linear model or MLP on your features and (soft) targets
//   softce predict        class probabilities (or logits) from a trained model
//   softce check-targets  validate a probability-target file, listing the bad rows
//   softce aggregate      soft labels from noisy votes: Dawid–Skene, vote fractions, majority
//
// Exit codes: 0 success; 2 bad input or usage (one message on stderr, no output left
// behind); 128 + signal number when interrupted (130 SIGINT, 143 SIGTERM; earlier outputs
// intact); 1 internal error. See docs/cli.md.
#include <CLI/CLI.hpp>
#include <softce/softce.hpp>

#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <new>
#include <string>

#include "cli_error.hpp"
#include "commands.hpp"
#include "limits.hpp"
#include "outputs.hpp"

using namespace softce::cli;

namespace {

// Range validators that name what is expected and refuse NaN/inf (CLI::Range and
// CLI::PositiveNumber let NaN through). CLI11 prefixes the message with the option's name.
std::string shortest(double v) {
  char buffer[32];
  auto [ptr, ec] = std::to_chars(buffer, buffer + sizeof buffer, v);
  return std::string(buffer, ec == std::errc() ? ptr : buffer);
}

// A finite number in [low, high], or in (low, high] when `open_low`.
CLI::Validator number_in(double low, double high, bool open_low = false) {
  const std::string range =
      (open_low ? "(" : "[") + shortest(low) + ", " + shortest(high) + "]";
  return CLI::Validator(
      [=](std::string& text) -> std::string {
        double v = 0;
        const char* begin = text.data() + (text.size() > 1 && text[0] == '+');
        const char* end = text.data() + text.size();
        auto [ptr, ec] = std::from_chars(begin, end, v);
        if (text.empty() || ptr != end || (ec != std::errc() && ec != std::errc::result_out_of_range))
          return "expected a number in " + range + ", not '" + text + "'";
        if (ec == std::errc::result_out_of_range || !std::isfinite(v) || v < low || v > high ||
            (open_low && v <= low))
          return "must be in " + range + ", not " + text;
        return {};
      },
      "NUMBER in " + range);
}

// An integer in [low, high] (no sign for unsigned options, so "-1" never wraps).
CLI::Validator integer_in(std::int64_t low, std::int64_t high) {
  const std::string range = "[" + std::to_string(low) + ", " + std::to_string(high) + "]";
  return CLI::Validator(
      [=](std::string& text) -> std::string {
        std::int64_t v = 0;
        const char* begin = text.data() + (text.size() > 1 && text[0] == '+');
        const char* end = text.data() + text.size();
        auto [ptr, ec] = std::from_chars(begin, end, v);
        if (text.empty() || ptr != end || ec == std::errc::invalid_argument)
          return "expected an integer in " + range + ", not '" + text + "'";
        if (ec == std::errc::result_out_of_range || v < low || v > high)
          return "must be an integer in " + range + ", not " + text;
        return {};
      },
      "INTEGER in " + range);
}

// A 64-bit seed: decimal digits only, at most 2^64 - 1.
CLI::Validator seed_value() {
  return CLI::Validator(
      [](std::string& text) -> std::string {
        std::uint64_t v = 0;
        const char* end = text.data() + text.size();
        auto [ptr, ec] = std::from_chars(text.data(), end, v);
        if (text.empty() || ptr != end || ec != std::errc())
          return "must be an integer in [0, 18446744073709551615], not " + text;
        return {};
      },
      "SEED in [0, 2^64-1]");
}


}  // namespace

int main(int argc, char** argv) {
  install_interrupt_handlers();

  CLI::App app{"softce: train and compare classifiers on soft labels (fused soft-label losses)",
               "softce"};
  app.require_subcommand(1);
  app.set_version_flag("--version", version_text());

  // demo
  demo_args demo;
  auto* demo_cmd = app.add_subcommand(
      "demo", "Fashion-MNIST: teacher MLP, then a student trained on hard labels, one-hot "
              "targets, label smoothing 0.1 and distillation; prints a table and the "
              "CE = H(target) + KL decomposition, writes DIR/results.json and PNG charts");
  demo_cmd->add_option("--out", demo.out, "output directory")->capture_default_str();
  demo_cmd->add_option("--scenario", demo.scenario,
                       "all (default), basic (hard vs soft-label students) or noisy (soft labels "
                       "from simulated noisy annotators: majority, vote fractions, Dawid-Skene)")
      ->capture_default_str();
  demo_cmd->add_option("--data", demo.data, "directory with the four Fashion-MNIST IDX files")
      ->capture_default_str();
  demo_cmd->add_option("--threads", demo.threads, "threads for OpenBLAS and softce (0: all cores)")
      ->check(integer_in(0, max_threads));
  demo_cmd->add_option("--seed", demo.seed, "random seed")->capture_default_str()->check(seed_value());
  demo_cmd->add_option("--progress", demo.progress, "auto, bar, lines or none")
      ->capture_default_str();
  demo_cmd->add_option("--temperature", demo.temperature, "distillation temperature T")
      ->capture_default_str()
      ->check(number_in(0, max_temperature, true));
  demo_cmd->add_option("--alpha", demo.alpha,
                       "distilled student: loss = alpha * CE(labels) + (1 - alpha) * T^2 KL")
      ->capture_default_str()
      ->check(number_in(0, 1));
  // reduced runs for tests (hidden from --help)
  demo_cmd->add_flag("--quick", demo.quick)->group("");
  demo_cmd->add_option("--train-limit", demo.train_limit)->group("")->check(integer_in(0, max_rows_limit));
  demo_cmd->add_option("--test-limit", demo.test_limit)->group("")->check(integer_in(0, max_rows_limit));
  demo_cmd->add_option("--epochs", demo.epochs)->group("")->check(integer_in(0, max_epochs));
  demo_cmd->add_option("--teacher-epochs", demo.teacher_epochs)->group("")->check(integer_in(0, max_epochs));

  // train
  train_args train;
  auto* train_cmd = app.add_subcommand("train", "train a classifier on features and targets");
  train_cmd->add_option("--features", train.features, "features: CSV, NPY or IDX (rows x D)")
      ->required();
  train_cmd->add_option("--targets", train.targets,
                        "targets: class indices (1 column), probabilities (C columns) or "
                        "top-k (2K columns, with --targets-format topk)")
      ->required();
  train_cmd->add_option("--val-features", train.val_features, "validation features");
  train_cmd->add_option("--val-targets", train.val_targets, "validation targets");
  train_cmd->add_option("--targets-format", train.targets_format, "auto, index, probs or topk")
      ->capture_default_str();
  train_cmd->add_option("--classes", train.classes, "number of classes (default: inferred)")
      ->check(integer_in(2, max_classes));
  train_cmd->add_flag("--normalize", train.normalize, "rescale probability rows to sum to 1");
  train_cmd->add_option("--tolerance", train.tolerance,
                        "allowed |row sum - 1| for probability targets")
      ->capture_default_str()
      ->check(number_in(0, 1));
  train_cmd->add_flag("--topk-tail", train.topk_tail,
                      "top-k targets: keep the mass outside the top k as one bucket");
  train_cmd->add_option("--model", train.architecture, "linear or mlp:H[,H2...]")
      ->capture_default_str();
  train_cmd->add_option("--loss", train.loss, "cross_entropy or kl")->capture_default_str();
  train_cmd->add_option("--teacher-logits", train.teacher_logits,
                        "teacher logits (rows x C) to distil from");
  train_cmd->add_option("--temperature", train.temperature, "distillation temperature T")
      ->capture_default_str()
      ->check(number_in(0, max_temperature, true));
  train_cmd->add_option("--alpha", train.alpha,
                        "with a teacher: loss = alpha * target loss + (1 - alpha) * T^2 KL")
      ->capture_default_str()
      ->check(number_in(0, 1));
  train_cmd->add_option("--label-smoothing", train.label_smoothing, "label smoothing in [0, 1]")
      ->capture_default_str()
      ->check(number_in(0, 1));
  train_cmd->add_option("--epochs", train.epochs)->capture_default_str()->check(integer_in(1, max_epochs));
  train_cmd->add_option("--batch-size", train.batch_size)->capture_default_str()->check(integer_in(1, max_batch));
  train_cmd->add_option("--lr", train.lr, "Adam learning rate")
      ->capture_default_str()
      ->check(number_in(0, max_learning_rate, true));
  train_cmd->add_option("--schedule", train.schedule, "cosine or constant")->capture_default_str();
  train_cmd->add_option("--seed", train.seed)->capture_default_str()->check(seed_value());
  train_cmd->add_option("--threads", train.threads, "threads for OpenBLAS and softce (0: all cores)")
      ->check(integer_in(0, max_threads));
  train_cmd->add_option("--out", train.out, "output directory (model.json, metrics.json)")
      ->required();
  train_cmd->add_option("--progress", train.progress, "auto, bar, lines or none")
      ->capture_default_str();

  // predict
  predict_args predict;
  auto* predict_cmd = app.add_subcommand("predict", "class probabilities from a trained model");
  predict_cmd->add_option("--model", predict.model, "model.json (or the directory holding it)")
      ->required();
  predict_cmd->add_option("--features", predict.features, "features: CSV, NPY or IDX")->required();
  predict_cmd->add_option("--out", predict.out, "output file: .npy (float32) or CSV")->required();
  predict_cmd->add_option("--output", predict.output, "probs or logits")->capture_default_str();
  predict_cmd->add_option("--threads", predict.threads)->check(integer_in(0, max_threads));

  // check-targets
  check_targets_args check;
  auto* check_cmd =
      app.add_subcommand("check-targets", "validate a target file and list the bad rows");
  check_cmd->add_option("file", check.file, "target file: CSV, NPY or IDX")->required();
  check_cmd->add_option("--targets-format", check.targets_format, "auto, index, probs or topk")
      ->capture_default_str();
  check_cmd->add_option("--classes", check.classes, "number of classes")
      ->check(integer_in(2, max_classes));
  check_cmd->add_option("--tolerance", check.tolerance, "allowed |row sum - 1|")
      ->capture_default_str()
      ->check(number_in(0, 1));
  check_cmd->add_flag("--normalize", check.normalize, "accept rows that --normalize can rescale");
  check_cmd->add_option("--max-report", check.max_report, "list at most this many bad rows")
      ->capture_default_str()
      ->check(integer_in(0, std::numeric_limits<std::int64_t>::max()));

  // aggregate
  aggregate_args aggregate;
  auto* aggregate_cmd = app.add_subcommand(
      "aggregate", "soft labels from several noisy votes per item: Dawid-Skene posteriors, "
                   "vote fractions or majority vote (one-hot), as (items, classes) probabilities "
                   "that train --targets reads; a JSON report with the annotator estimates beside");
  aggregate_cmd->add_option("--votes", aggregate.votes,
                            "votes: CSV, NPY or IDX; wide (items x annotators, class id or -1 "
                            "for no vote) or long (rows of item, annotator, label)")
      ->required();
  aggregate_cmd->add_option("--votes-format", aggregate.votes_format, "wide or long")
      ->capture_default_str();
  aggregate_cmd->add_option("--method", aggregate.method, "dawid-skene, vote-fractions or majority")
      ->capture_default_str();
  aggregate_cmd->add_option("--classes", aggregate.classes, "number of classes (default: inferred)")
      ->check(integer_in(2, max_classes));
  aggregate_cmd->add_option("--max-iterations", aggregate.max_iterations, "Dawid-Skene: EM iterations at most")
      ->capture_default_str()
      ->check(integer_in(1, max_em_iterations));
  aggregate_cmd->add_option("--tolerance", aggregate.tolerance,
                            "Dawid-Skene: stop when the log-likelihood per item improves by less "
                            "(0: run every iteration)")
      ->capture_default_str()
      ->check(number_in(0, 1));
  aggregate_cmd->add_option("--smoothing", aggregate.smoothing,
                            "Dawid-Skene: added to every confusion count (0: maximum likelihood)")
      ->capture_default_str()
      ->check(number_in(0, max_smoothing));
  aggregate_cmd->add_option("--threads", aggregate.threads, "threads (0: all cores)")
      ->check(integer_in(0, max_threads));
  aggregate_cmd->add_option("--progress", aggregate.progress, "auto, lines or none")
      ->capture_default_str();
  aggregate_cmd->add_option("--out", aggregate.out,
                            "output file: .npy (float32) or CSV; the report goes to NAME.json "
                            "beside it")
      ->required();

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "softce: error: %s\n", e.what());
    return 2;
  }

  try {
    if (*demo_cmd) return run_demo(demo);
    if (*train_cmd) return run_train(train);
    if (*predict_cmd) return run_predict(predict);
    if (*check_cmd) return run_check_targets(check);
    if (*aggregate_cmd) return run_aggregate(aggregate);
    return 2;
  } catch (const interrupted&) {
    std::fprintf(stderr, "softce: interrupted; no output written, earlier outputs unchanged\n");
    return 130;

  } catch (const input_error& e) {
    std::fprintf(stderr, "softce: error: %s\n", e.what());
    return 2;
  } catch (const softce::error& e) {
    std::fprintf(stderr, "softce: error: %s\n", e.what());
    return 2;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "softce: error: out of memory\n");
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "softce: internal error: %s\n", e.what());
    return 1;
  }
}
