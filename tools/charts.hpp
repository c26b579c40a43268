// softce CLI — the demo's PNG charts, drawn with PLplot (pngcairo device).
//
// reliability diagram: one panel per model, bars = accuracy per confidence bin, the dashed
// diagonal = perfect calibration, plus one panel with every model's curve;
// accuracy/NLL chart: test accuracy and test NLL after each epoch, one line per model.
#pragma once

#include <string>
#include <vector>

#include "training.hpp"

namespace softce::cli {

struct chart_series {
  std::string name;
  int red = 0, green = 0, blue = 0;
  int line_style = 1;                 // PLplot line style: 1 solid, 2 dashed, ...
  double ece = 0;
  std::vector<reliability_bin> bins;
  std::vector<double> accuracy, nll;  // per epoch, on the test set
};

// Empty when PNG charts can be drawn; otherwise why not (built without PLplot, or PLplot's
// cairo driver — Debian package plplot-driver-cairo — is missing).
std::string charts_unavailable_reason();
std::string plotting_library_version();

void write_reliability_png(const std::string& path, const std::vector<chart_series>& series);
void write_accuracy_nll_png(const std::string& path, const std::vector<chart_series>& series);

}  // namespace softce::cli
