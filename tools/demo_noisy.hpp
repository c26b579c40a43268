// softce CLI — the demo's noisy-votes scenario (`softce demo --scenario noisy`, and the second
// part of the default run): when do soft labels beat hard ones?
//
// Several simulated annotators label every Fashion-MNIST training image, with class- and
// image-dependent confusion (the model is in demo_noisy.cpp and docs/cli.md); the votes are
// turned into targets four ways (majority vote, majority + label smoothing, vote fractions,
// Dawid–Skene posteriors) and the same student is trained on each, and on the clean labels,
// with 3 seeds; test accuracy, NLL and ECE as mean ± std.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "charts.hpp"
#include "table.hpp"
#include "targets.hpp"

namespace softce::cli {

struct noisy_config {
  std::vector<std::int64_t> hidden{64};  // the student of the first part
  int epochs = 10;
  int seeds = 3;
  std::int64_t batch_size = 128;
  double lr = 1e-3;
  double label_smoothing = 0.1;
  std::uint64_t seed = 0;  // --seed: the annotators' votes and the students' seeds
  std::string progress = "auto";
};

struct noisy_outcome {
  nlohmann::json json;                // results.json's "noisy"
  std::vector<chart_series> series;   // one per target kind (per-epoch means over seeds)
  std::string report;                 // the printed tables
};

noisy_outcome run_noisy_scenario(const table& train_images, const targets& train_labels,
                                 const table& test_images, const targets& test_labels,
                                 const noisy_config& config);

}  // namespace softce::cli
