// softce CLI — the subcommands. Each returns the process exit code; bad input (including an
// option out of range, an input over a limit in limits.hpp, or training that diverged) is
// reported by throwing input_error (exit 2). Signals end the program from their handler
// (outputs.hpp: exit 128 + the signal number).
#pragma once

#include <cstdint>
#include <string>

namespace softce::cli {

struct train_args {
  std::string features, targets, val_features, val_targets, teacher_logits;
  std::string architecture = "mlp:128";
  std::string loss = "cross_entropy";
  std::string targets_format = "auto";
  std::int64_t classes = 0;
  bool normalize = false, topk_tail = false;
  double tolerance = 1e-3;
  double temperature = 1.0, alpha = 0.5, label_smoothing = 0.0;
  int epochs = 10;
  std::int64_t batch_size = 128;
  double lr = 1e-3;
  std::string schedule = "cosine";
  std::uint64_t seed = 0;
  int threads = 0;
  std::string out;
  std::string progress = "auto";
};

struct predict_args {
  std::string model, features, out;
  std::string output = "probs";  // probs | logits
  int threads = 0;
};

struct check_targets_args {
  std::string file;
  std::string targets_format = "auto";
  std::int64_t classes = 0;
  bool normalize = false;
  double tolerance = 1e-3;
  std::int64_t max_report = 100;
};

struct demo_args {
  std::string out = "softce-demo";
  std::string scenario = "all";  // all | basic | noisy
  std::string data = "/usr/share/datasets/fashion-mnist";
  int threads = 0;
  std::uint64_t seed = 0;
  std::string progress = "auto";
  double temperature = 2.0;  // distillation temperature
  double alpha = 0.5;        // weight of the hard-label CE in the distilled student's loss
  // reduced runs (tests): 0 keeps the default
  bool quick = false;
  std::int64_t train_limit = 0, test_limit = 0;
  int epochs = 0, teacher_epochs = 0;
};

struct aggregate_args {
  std::string votes, out;
  std::string votes_format = "wide";   // wide | long
  std::string method = "dawid-skene";  // dawid-skene | vote-fractions | majority
  std::int64_t classes = 0;            // 0: max class id + 1
  int max_iterations = 100;
  double tolerance = 1e-5;
  double smoothing = 0.0;
  int threads = 0;
  std::string progress = "auto";       // auto | lines | none
};

int run_train(const train_args& args);
int run_aggregate(const aggregate_args& args);
int run_predict(const predict_args& args);
int run_check_targets(const check_targets_args& args);
int run_demo(const demo_args& args);

// Sets OpenBLAS's and softce's thread counts (0: the number of hardware threads); returns
// the count used.
int set_threads(int threads);
std::string version_text();

}  // namespace softce::cli
