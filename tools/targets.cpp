// softce CLI — target validation and conversion (see targets.hpp).
#include "targets.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <utility>

#include "cli_error.hpp"
#include "limits.hpp"

namespace softce::cli {

namespace {

std::string number(double v) {
  char buffer[32];
  auto [ptr, ec] = std::to_chars(buffer, buffer + sizeof buffer, static_cast<float>(v));
  return std::string(buffer, ec == std::errc() ? ptr : buffer);
}

bool is_class_index(float v) { return std::isfinite(v) && v >= 0 && v == std::floor(v); }

// Checks one class index. Returns an empty string when it is fine.
std::string index_problem(float v, std::int64_t classes, const std::string& column) {
  if (!is_class_index(v))
    return "class index " + number(v) + column + " is not a non-negative integer";
  if (classes > 0 && v >= static_cast<float>(classes))
    return "class index " + number(v) + column + " is out of range for " +
           std::to_string(classes) + " classes";
  // Checked before any conversion to an integer (a float beyond int64 would be undefined
  // behaviour there), and before the class count is inferred from it (3e9 classes would be
  // allocated).
  if (v >= static_cast<float>(max_classes))
    return "class index " + number(v) + column + " exceeds the limit of " +
           std::to_string(max_classes - 1) + " (at most " + std::to_string(max_classes) +
           " classes)";
  return {};
}

}  // namespace

const char* kind_name(target_kind kind) {
  switch (kind) {
    case target_kind::index: return "class indices";
    case target_kind::probability: return "probabilities";
    case target_kind::topk: return "top-k probabilities";
  }
  return "?";
}

target_kind resolve_kind(const table& t, const target_options& options) {
  if (options.format == "index") {
    if (t.cols != 1)
      throw input_error(t.path + ": class-index targets need 1 column, the file has " +
                        std::to_string(t.cols));
    return target_kind::index;
  }
  if (options.format == "topk") {
    if (t.cols % 2 != 0)
      throw input_error(t.path + ": top-k targets need 2K columns (K indices, K probabilities), "
                        "the file has " + std::to_string(t.cols));
    return target_kind::topk;
  }
  if (options.format == "probs") {
    if (t.cols < 2)
      throw input_error(t.path + ": probability targets need one column per class (at least 2), "
                        "the file has " + std::to_string(t.cols));
    return target_kind::probability;
  }
  if (options.format != "auto")
    throw input_error("unknown targets format '" + options.format +
                      "' (expected auto, index, probs or topk)");
  return t.cols == 1 ? target_kind::index : target_kind::probability;
}

std::vector<row_problem> find_target_problems(const table& t, const target_options& options,
                                              std::int64_t keep, std::int64_t* count) {
  std::vector<row_problem> problems;
  std::int64_t found = 0;
  const target_kind kind = resolve_kind(t, options);
  if (kind == target_kind::probability && options.classes > 0 && t.cols != options.classes)
    throw input_error(t.path + ": " + std::to_string(t.cols) + " probability columns but " +
                      std::to_string(options.classes) + " classes");
  const auto report = [&](std::int64_t row, const std::string& what) {
    if (found++ < keep) problems.push_back({row, t.where(row) + ": " + what});
  };
  const auto column = [&](std::int64_t c) {
    return t.cols > 1 ? " in column " + std::to_string(c + 1) : std::string();
  };

  std::vector<std::pair<float, std::int64_t>> sorted;  // (index, column) of a top-k row
  for (std::int64_t r = 0; r < t.rows; ++r) {
    const float* row = &t.values[r * t.cols];
    if (kind == target_kind::index) {
      std::string p = index_problem(row[0], options.classes, "");
      if (!p.empty()) report(r, p);
      continue;
    }
    // probability values (all columns, or the second half for top-k)
    const std::int64_t first = kind == target_kind::topk ? t.cols / 2 : 0;
    std::string p;
    double sum = 0;
    // top-k indices: the first problem in column order, a bad index or a repeat of an
    // earlier one; repeats are found by sorting (K log K, not K^2)
    std::int64_t bad = first;
    for (std::int64_t c = 0; c < first && bad == first; ++c)
      if (!index_problem(row[c], options.classes, "").empty()) bad = c;
    if (bad > 0) {
      sorted.clear();
      for (std::int64_t c = 0; c < bad; ++c) sorted.emplace_back(row[c], c);
      std::sort(sorted.begin(), sorted.end());
      std::int64_t repeat = bad, earlier = 0;  // the smallest column repeating an earlier one
      for (std::size_t i = 1; i < sorted.size(); ++i)
        if (sorted[i].first == sorted[i - 1].first && sorted[i].second < repeat) {
          std::size_t g = i - 1;
          while (g > 0 && sorted[g - 1].first == sorted[i].first) --g;
          repeat = sorted[i].second;
          earlier = sorted[g].second;
        }
      if (repeat < bad)
        p = "duplicate class index " + number(row[repeat]) + " in columns " +
            std::to_string(earlier + 1) + " and " + std::to_string(repeat + 1);
    }
    if (p.empty() && bad < first) p = index_problem(row[bad], options.classes, column(bad));
    for (std::int64_t c = first; c < t.cols && p.empty(); ++c) {
      if (!std::isfinite(row[c])) p = "non-finite probability " + number(row[c]) + column(c);
      else if (row[c] < 0) p = "negative probability " + number(row[c]) + column(c);
      sum += row[c];
    }
    if (p.empty()) {
      if (options.normalize) {
        if (!(sum > 0)) p = "probabilities sum to 0; cannot normalize";
      } else if (kind == target_kind::topk ? sum > 1 + options.tolerance
                                           : std::fabs(sum - 1) > options.tolerance) {
        p = "probabilities sum to " + number(sum) + (kind == target_kind::topk ? ", over 1" : "") +
            " (tolerance " + number(options.tolerance) + "; --normalize rescales rows)";
      }
    }
    if (!p.empty()) report(r, p);
  }
  if (count) *count = found;
  return problems;
}

targets interpret_targets(const table& t, const target_options& options) {
  auto problems = find_target_problems(t, options, 1);
  if (!problems.empty()) throw input_error(problems.front().message);
  targets out;
  out.kind = resolve_kind(t, options);
  out.rows = t.rows;
  out.label.resize(t.rows);
  if (out.kind == target_kind::index) {
    std::int64_t max_index = 0;
    out.index.resize(t.rows);
    for (std::int64_t r = 0; r < t.rows; ++r) {
      out.index[r] = static_cast<std::int64_t>(t.values[r]);
      out.label[r] = out.index[r];
      max_index = std::max(max_index, out.index[r]);
    }
    out.classes = options.classes > 0 ? options.classes : max_index + 1;
  } else if (out.kind == target_kind::probability) {
    out.classes = t.cols;
    out.probability = t.values;
    for (std::int64_t r = 0; r < t.rows; ++r) {
      float* row = &out.probability[r * t.cols];
      double sum = 0;
      std::int64_t best = 0;
      for (std::int64_t c = 0; c < t.cols; ++c) {
        sum += row[c];
        if (row[c] > row[best]) best = c;
      }
      if (options.normalize)
        for (std::int64_t c = 0; c < t.cols; ++c) row[c] = static_cast<float>(row[c] / sum);
      out.label[r] = best;
    }
  } else {
    out.k = t.cols / 2;
    out.index.resize(t.rows * out.k);
    out.probability.resize(t.rows * out.k);
    std::int64_t max_index = 0;
    for (std::int64_t r = 0; r < t.rows; ++r) {
      const float* row = &t.values[r * t.cols];
      double sum = 0;
      std::int64_t best = 0;
      for (std::int64_t j = 0; j < out.k; ++j) {
        out.index[r * out.k + j] = static_cast<std::int64_t>(row[j]);
        out.probability[r * out.k + j] = row[out.k + j];
        sum += row[out.k + j];
        max_index = std::max(max_index, out.index[r * out.k + j]);
        if (row[out.k + j] > row[out.k + best]) best = j;
      }
      if (options.normalize)
        for (std::int64_t j = 0; j < out.k; ++j)
          out.probability[r * out.k + j] = static_cast<float>(row[out.k + j] / sum);
      out.label[r] = out.index[r * out.k + best];
    }
    out.classes = options.classes > 0 ? options.classes : max_index + 1;
  }
  if (out.classes > max_classes)
    throw input_error(t.path + ": " + std::to_string(out.classes) +
                      " classes, more than the limit of " + std::to_string(max_classes));
  if (out.classes < 2)
    throw input_error(t.path + ": the targets name only " + std::to_string(out.classes) +
                      " class; at least 2 are needed (pass --classes if some are absent)");
  return out;
}

}  // namespace softce::cli
