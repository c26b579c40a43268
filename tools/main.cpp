// softce — command-line program: train and compare classifiers on soft labels.
//
//   softce demo           Fashion-MNIST: teacher, then one student four ways (hard, one-hot,
//                         label smoothing, distilled); table, CE = H + KL, results.json, PNGs
//   softce train          train a linear model or MLP on your features and (soft) targets
//   softce predict        class probabilities (or logits) from a trained model
//   softce check-targets  validate a probability-target file, listing the bad rows
//
// Exit codes: 0 success; 2 bad input or usage (one message on stderr, no output left
// behind); 130 interrupted (earlier outputs intact); 1 internal error. See docs/cli.md.
#include <CLI/CLI.hpp>
#include <softce/softce.hpp>

#include <cstdio>
#include <new>

#include "cli_error.hpp"
#include "commands.hpp"
#include "outputs.hpp"

using namespace softce::cli;

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
  demo_cmd->add_option("--data", demo.data, "directory with the four Fashion-MNIST IDX files")
      ->capture_default_str();
  demo_cmd->add_option("--threads", demo.threads, "threads for OpenBLAS and softce (0: all cores)");
  demo_cmd->add_option("--seed", demo.seed, "random seed")->capture_default_str();
  demo_cmd->add_option("--progress", demo.progress, "auto, bar, lines or none")
      ->capture_default_str();
  demo_cmd->add_option("--temperature", demo.temperature, "distillation temperature T")
      ->capture_default_str();
  demo_cmd->add_option("--alpha", demo.alpha,
                       "distilled student: loss = alpha * CE(labels) + (1 - alpha) * T^2 KL")
      ->capture_default_str();
  // reduced runs for tests (hidden from --help)
  demo_cmd->add_flag("--quick", demo.quick)->group("");
  demo_cmd->add_option("--train-limit", demo.train_limit)->group("");
  demo_cmd->add_option("--test-limit", demo.test_limit)->group("");
  demo_cmd->add_option("--epochs", demo.epochs)->group("");
  demo_cmd->add_option("--teacher-epochs", demo.teacher_epochs)->group("");

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
  train_cmd->add_option("--classes", train.classes, "number of classes (default: inferred)");
  train_cmd->add_flag("--normalize", train.normalize, "rescale probability rows to sum to 1");
  train_cmd->add_option("--tolerance", train.tolerance,
                        "allowed |row sum - 1| for probability targets")
      ->capture_default_str();
  train_cmd->add_flag("--topk-tail", train.topk_tail,
                      "top-k targets: keep the mass outside the top k as one bucket");
  train_cmd->add_option("--model", train.architecture, "linear or mlp:H[,H2...]")
      ->capture_default_str();
  train_cmd->add_option("--loss", train.loss, "cross_entropy or kl")->capture_default_str();
  train_cmd->add_option("--teacher-logits", train.teacher_logits,
                        "teacher logits (rows x C) to distil from");
  train_cmd->add_option("--temperature", train.temperature, "distillation temperature T")
      ->capture_default_str();
  train_cmd->add_option("--alpha", train.alpha,
                        "with a teacher: loss = alpha * target loss + (1 - alpha) * T^2 KL")
      ->capture_default_str();
  train_cmd->add_option("--label-smoothing", train.label_smoothing, "label smoothing in [0, 1]")
      ->capture_default_str();
  train_cmd->add_option("--epochs", train.epochs)->capture_default_str();
  train_cmd->add_option("--batch-size", train.batch_size)->capture_default_str();
  train_cmd->add_option("--lr", train.lr, "Adam learning rate")->capture_default_str();
  train_cmd->add_option("--schedule", train.schedule, "cosine or constant")->capture_default_str();
  train_cmd->add_option("--seed", train.seed)->capture_default_str();
  train_cmd->add_option("--threads", train.threads, "threads for OpenBLAS and softce (0: all cores)");
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
  predict_cmd->add_option("--threads", predict.threads);

  // check-targets
  check_targets_args check;
  auto* check_cmd =
      app.add_subcommand("check-targets", "validate a target file and list the bad rows");
  check_cmd->add_option("file", check.file, "target file: CSV, NPY or IDX")->required();
  check_cmd->add_option("--targets-format", check.targets_format, "auto, index, probs or topk")
      ->capture_default_str();
  check_cmd->add_option("--classes", check.classes, "number of classes");
  check_cmd->add_option("--tolerance", check.tolerance, "allowed |row sum - 1|")
      ->capture_default_str();
  check_cmd->add_flag("--normalize", check.normalize, "accept rows that --normalize can rescale");
  check_cmd->add_option("--max-report", check.max_report, "list at most this many bad rows")
      ->capture_default_str();

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e);
    return code == 0 ? 0 : 2;
  }

  try {
    if (*demo_cmd) return run_demo(demo);
    if (*train_cmd) return run_train(train);
    if (*predict_cmd) return run_predict(predict);
    if (*check_cmd) return run_check_targets(check);
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
