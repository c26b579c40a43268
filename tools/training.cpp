// softce CLI — training loop and metrics (see training.hpp).
#include "training.hpp"

#include <softce/softce.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <string>
#include <numbers>

#include "cli_error.hpp"
#include "outputs.hpp"

namespace softce::cli {

namespace {

bool all_finite(const float* v, std::int64_t n) {
  // x - x is 0 for every finite x and NaN for NaN and ±inf; one sum checks them all.
  float acc = 0;
  for (std::int64_t i = 0; i < n; ++i) acc += v[i] - v[i];
  return acc == 0;
}

// Training went numerically wrong: say where and what, and what to change.
[[noreturn]] void diverged(int epoch, std::int64_t batch, const std::string& what,
                           const train_config& config) {
  char lr[32];
  std::snprintf(lr, sizeof lr, "%g", config.lr);
  std::string hint = "lower --lr (now " + std::string(lr) + ")";
  if (config.loss.teacher_logits) {
    char t[32];
    std::snprintf(t, sizeof t, "%g", config.loss.temperature);
    hint += ", bring --temperature (now " + std::string(t) + ") closer to 1";
  }
  hint += " or rescale the inputs";
  throw input_error("training diverged in epoch " + std::to_string(epoch) + ", batch " +
                    std::to_string(batch + 1) + ": " + what + "; " + hint +
                    " (nothing was written)");
}

// The target part of the loss for one batch, its gradient written to `grad` (B, C).
double target_loss(const float* logits, std::int64_t B, std::int64_t C, const targets& t,
                   const std::vector<std::int64_t>& batch_index,
                   const std::vector<float>& batch_probability, const loss_config& config,
                   float* grad) {
  softce::cross_entropy_options options;
  options.label_smoothing = config.label_smoothing;
  softce::outputs out;
  out.grad = softce::view(grad, {B, C});
  const auto input = softce::view(logits, {B, C});
  switch (t.kind) {
    case target_kind::index:
      return softce::cross_entropy(input, softce::view(batch_index.data(), {B}), options, out);
    case target_kind::probability:
      return softce::cross_entropy(input, softce::view(batch_probability.data(), {B, C}), options,
                                   out);
    case target_kind::topk: {
      softce::topk target{softce::view(batch_index.data(), {B, t.k}),
                          softce::view(batch_probability.data(), {B, t.k}), config.topk_tail};
      return softce::cross_entropy(input, target, options, out);
    }
  }
  return 0;
}

}  // namespace

std::vector<double> target_entropy(const targets& t, double eps, bool topk_tail) {
  const auto h = [](double p) { return p > 0 ? -p * std::log(p) : 0.0; };
  const std::int64_t C = t.classes;
  std::vector<double> H(t.rows, 0.0);
  for (std::int64_t r = 0; r < t.rows; ++r) {
    double e = 0;
    if (t.kind == target_kind::index) {
      e = h((1 - eps) + eps / C) + (C - 1) * h(eps / C);
    } else if (t.kind == target_kind::probability) {
      for (std::int64_t c = 0; c < C; ++c) e += h((1 - eps) * t.probability[r * C + c] + eps / C);
    } else {
      double mass = 0;
      for (std::int64_t j = 0; j < t.k; ++j) {
        const double v = t.probability[r * t.k + j];
        mass += v;
        e += h((1 - eps) * v + eps / C);
      }
      e += (C - t.k) * h(eps / C);
      if (topk_tail) e += h(std::max(0.0, 1 - mass));
    }
    H[r] = e;
  }
  return H;
}

std::vector<epoch_record> train(model& m, const float* x, std::int64_t rows, const targets& t,
                                const train_config& config, const train_hooks& hooks) {
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  const std::int64_t D = m.inputs, C = m.classes;
  const std::int64_t B_max = std::max<std::int64_t>(1, std::min(config.batch_size, rows));
  const std::int64_t batches = (rows + B_max - 1) / B_max;
  const std::int64_t total_steps = batches * config.epochs;
  const loss_config& lc = config.loss;
  const bool distill = lc.teacher_logits != nullptr;
  const double alpha = distill ? lc.alpha : 1.0;
  const std::vector<double> entropy =
      lc.kl_objective ? target_entropy(t, lc.label_smoothing, lc.topk_tail) : std::vector<double>{};

  random_generator rng(config.seed ^ 0x5eedba7c4e5ull);  // batch order; init used `seed`
  std::vector<std::int64_t> order(rows);
  for (std::int64_t i = 0; i < rows; ++i) order[i] = i;

  workspace ws;
  gradients g;
  adam optimizer(m);
  std::vector<float> xb(B_max * D), grad(B_max * C), grad_teacher(B_max * C), teacher(B_max * C);
  std::vector<std::int64_t> bi;
  std::vector<float> bp;
  std::vector<epoch_record> history;
  std::int64_t step = 0;

  for (int epoch = 1; epoch <= config.epochs; ++epoch) {
    shuffle(order, rng);
    double loss_sum = 0;
    std::int64_t seen = 0;
    for (std::int64_t b = 0; b < batches; ++b) {
      const std::int64_t first = b * B_max, B = std::min(B_max, rows - first);
      // gather the batch: x (B, D), targets, teacher logits (B, C)
      for (std::int64_t i = 0; i < B; ++i) {
        const std::int64_t r = order[first + i];
        std::copy(x + r * D, x + (r + 1) * D, xb.begin() + i * D);
        if (distill)
          std::copy(lc.teacher_logits + r * C, lc.teacher_logits + (r + 1) * C,
                    teacher.begin() + i * C);
      }
      if (t.kind == target_kind::index) {
        bi.resize(B);
        for (std::int64_t i = 0; i < B; ++i) bi[i] = t.index[order[first + i]];
      } else {
        const std::int64_t width = t.kind == target_kind::probability ? C : t.k;
        bp.resize(B * width);
        if (t.kind == target_kind::topk) bi.resize(B * width);
        for (std::int64_t i = 0; i < B; ++i) {
          const std::int64_t r = order[first + i];
          std::copy(&t.probability[r * width], &t.probability[(r + 1) * width], &bp[i * width]);
          if (t.kind == target_kind::topk)
            std::copy(&t.index[r * width], &t.index[(r + 1) * width], &bi[i * width]);
        }
      }

      forward(m, xb.data(), B, ws);
      if (!all_finite(ws.logits(), B * C))
        diverged(epoch, b, "the logits overflowed float32 (inf or NaN)", config);
      double loss = 0;
      if (alpha > 0) {
        loss = target_loss(ws.logits(), B, C, t, bi, bp, lc, grad.data());
        if (lc.kl_objective) {
          double h = 0;
          for (std::int64_t i = 0; i < B; ++i) h += entropy[order[first + i]];
          loss -= h / static_cast<double>(B);
        }
      }
      if (distill) {
        softce::distillation_options options;
        options.temperature = lc.temperature;
        options.kind = softce::divergence::kl;
        options.reduce = softce::reduction::batchmean;
        softce::outputs out;
        out.grad = softce::view(grad_teacher.data(), {B, C});
        const double kd = softce::distillation_loss(softce::view(ws.logits(), {B, C}),
                                                    softce::view(teacher.data(), {B, C}),
                                                    options, out);
        if (alpha > 0) {
          const float a = static_cast<float>(alpha), a1 = static_cast<float>(1 - alpha);
          for (std::int64_t i = 0; i < B * C; ++i) grad[i] = a * grad[i] + a1 * grad_teacher[i];
          loss = alpha * loss + (1 - alpha) * kd;
        } else {
          std::copy(grad_teacher.begin(), grad_teacher.begin() + B * C, grad.begin());
          loss = kd;
        }
      }
      if (!std::isfinite(loss))
        diverged(epoch, b, std::string("the loss became ") + (std::isnan(loss) ? "NaN" : "infinite"),
                 config);
      if (!all_finite(grad.data(), B * C))
        diverged(epoch, b, "the loss gradient is not finite", config);
      backward(m, ws, grad.data(), g);
      const double lr =
          config.cosine
              ? config.lr * 0.5 *
                    (1 + std::cos(std::numbers::pi * static_cast<double>(step) /
                                  static_cast<double>(total_steps)))
              : config.lr;
      optimizer.step(m, g, lr);
      for (const auto& layer : m.layers)
        if (!all_finite(layer.weight.data(), static_cast<std::int64_t>(layer.weight.size())) ||
            !all_finite(layer.bias.data(), static_cast<std::int64_t>(layer.bias.size())))
          diverged(epoch, b, "a weight became inf or NaN", config);
      ++step;
      loss_sum += loss * static_cast<double>(B);
      seen += B;
      if (hooks.on_batch) hooks.on_batch(epoch, b + 1, batches, loss_sum / static_cast<double>(seen));
      throw_if_interrupted();
    }
    epoch_record record;
    record.epoch = epoch;
    record.train_loss = loss_sum / static_cast<double>(seen);
    record.seconds = std::chrono::duration<double>(clock::now() - start).count();
    if (hooks.on_epoch) hooks.on_epoch(record);
    history.push_back(std::move(record));
    throw_if_interrupted();
  }
  return history;
}

evaluation evaluate(const float* logits, std::int64_t rows, std::int64_t classes,
                    const targets& t) {
  evaluation e;
  e.rows = rows;
  const std::int64_t C = classes;
  // NLL through the library: index targets = the labels.
  e.nll = softce::cross_entropy(softce::view(logits, {rows, C}),
                                softce::view(t.label.data(), {rows}));
  if (t.kind == target_kind::index) {
    e.cross_entropy = e.nll;
  } else if (t.kind == target_kind::probability) {
    e.cross_entropy = softce::cross_entropy(softce::view(logits, {rows, C}),
                                            softce::view(t.probability.data(), {rows, C}));
  } else {
    softce::topk target{softce::view(t.index.data(), {rows, t.k}),
                        softce::view(t.probability.data(), {rows, t.k}), false};
    e.cross_entropy = softce::cross_entropy(softce::view(logits, {rows, C}), target);
  }
  std::vector<double> count(ece_bins, 0), confidence(ece_bins, 0), correct(ece_bins, 0);
  std::int64_t right = 0;
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* x = logits + r * C;
    // (the commands check first and name the file; this keeps the bin index below defined)
    if (!all_finite(x, C))
      throw input_error("the model's logits overflow float32 (inf or NaN) on row " +
                        std::to_string(r) + " of the evaluated data: its features are far "
                        "outside the range of the training features");
    std::int64_t best = 0;
    for (std::int64_t c = 1; c < C; ++c)
      if (x[c] > x[best]) best = c;
    double s = 0;
    for (std::int64_t c = 0; c < C; ++c) s += std::exp(static_cast<double>(x[c]) - x[best]);
    const double p = 1.0 / s;  // max probability
    const bool ok = best == t.label[r];
    right += ok;
    int bin = static_cast<int>(std::ceil(p * ece_bins)) - 1;
    bin = std::clamp(bin, 0, ece_bins - 1);
    count[bin] += 1;
    confidence[bin] += p;
    correct[bin] += ok;
  }
  e.accuracy = static_cast<double>(right) / static_cast<double>(rows);
  for (int b = 0; b < ece_bins; ++b) {
    reliability_bin bin;
    bin.lower = static_cast<double>(b) / ece_bins;
    bin.upper = static_cast<double>(b + 1) / ece_bins;
    bin.count = static_cast<std::int64_t>(count[b]);
    if (count[b] > 0) {
      bin.confidence = confidence[b] / count[b];
      bin.accuracy = correct[b] / count[b];
      e.ece += count[b] / static_cast<double>(rows) * std::fabs(bin.accuracy - bin.confidence);
    }
    e.bins.push_back(bin);
  }
  return e;
}

}  // namespace softce::cli
