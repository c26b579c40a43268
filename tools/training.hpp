// softce CLI — the training loop and the evaluation metrics, on the core library's losses.
//
// One step: gather a shuffled mini-batch, forward, compute the loss AND its gradient with one
// softce call (cross_entropy with index, probability or top-k targets; distillation_loss for
// a teacher), backward, Adam. The objective for a batch is
//     alpha · target_loss + (1 − alpha) · distillation_loss(student, teacher, T)   (teacher)
//     target_loss                                                                  (otherwise)
// where target_loss is cross_entropy (mean over the batch, with label smoothing ε) or, for
// --loss kl, KL(t'‖softmax(x)) = cross_entropy − H(t') (t' the smoothed target; the gradient
// is the same, only the reported value differs), and distillation_loss is T²·KL(p_T‖q_T),
// averaged over the batch (softce's batchmean).
// The learning rate follows a cosine from lr down to 0 over all steps ("cosine") or stays
// constant. Batch order comes from a seeded Fisher–Yates shuffle per epoch, so a seed and a
// thread count fix the whole run.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "model.hpp"
#include "targets.hpp"

namespace softce::cli {

struct loss_config {
  bool kl_objective = false;        // report KL instead of cross-entropy (same gradient)
  double label_smoothing = 0.0;
  bool topk_tail = false;
  const float* teacher_logits = nullptr;  // (rows, classes), aligned with the training rows
  double temperature = 1.0;
  double alpha = 0.5;               // weight of the target loss when a teacher is given
};

struct train_config {
  int epochs = 10;
  std::int64_t batch_size = 128;
  double lr = 1e-3;
  bool cosine = true;
  std::uint64_t seed = 0;
  loss_config loss;
};

struct reliability_bin {
  double lower = 0, upper = 0;
  std::int64_t count = 0;
  double confidence = 0;  // mean max-probability of the bin's rows
  double accuracy = 0;    // fraction of the bin's rows predicted correctly
};

struct evaluation {
  std::int64_t rows = 0;
  double accuracy = 0;
  double nll = 0;            // mean −log q(label), label = index or argmax of the target
  double ece = 0;            // expected calibration error, 15 equal-width confidence bins
  double cross_entropy = 0;  // mean CE against the targets as given (= nll for indices)
  std::vector<reliability_bin> bins;
};

inline constexpr int ece_bins = 15;

// Metrics of logits (rows, classes) against targets (losses through softce).
evaluation evaluate(const float* logits, std::int64_t rows, std::int64_t classes,
                    const targets& t);

struct epoch_record {
  int epoch = 0;              // 1-based
  double train_loss = 0;      // mean objective over the epoch's batches (weighted by size)
  double seconds = 0;         // since the start of training
  std::optional<evaluation> validation;
};

struct train_hooks {
  // after each batch: epoch (1-based), batches done in the epoch, batches per epoch,
  // running mean loss of the epoch
  std::function<void(int, std::int64_t, std::int64_t, double)> on_batch;
  // after each epoch; may fill record.validation
  std::function<void(epoch_record&)> on_epoch;
};

// Trains `m` in place. Polls the interrupt flag after every batch (throws interrupted).
std::vector<epoch_record> train(model& m, const float* x, std::int64_t rows, const targets& t,
                                const train_config& config, const train_hooks& hooks = {});

// Per-row entropy of the (smoothed) targets, −Σ t' log t' (0·log 0 = 0).
std::vector<double> target_entropy(const targets& t, double label_smoothing, bool topk_tail);

}  // namespace softce::cli
