// softce CLI — interpreting a table as training targets, and validating them.
//
// Three forms, told apart by --targets-format (auto: one column = class indices, otherwise
// probability rows):
//   index        one column of class indices (integers in [0, C))
//   probability  C columns of class probabilities: each >= 0, each row summing to 1 within
//                `tolerance` (or rescaled to sum 1 with `normalize`)
//   topk         2K columns: K class indices, then their K probabilities (sum <= 1 within
//                tolerance; the remaining mass is dropped, or with `tail` kept as one bucket
//                term, see softce::topk)
// Every row problem is reported with the row's location (table::where).
#pragma once

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "table.hpp"

namespace softce::cli {

enum class target_kind { index, probability, topk };

struct target_options {
  std::string format = "auto";  // auto | index | probs | topk
  std::int64_t classes = 0;     // 0: infer (index: max + 1; probability: columns)
  bool normalize = false;       // rescale probability rows to sum 1
  double tolerance = 1e-3;      // |row sum - 1| allowed without normalize
};

struct targets {
  target_kind kind = target_kind::index;
  std::int64_t rows = 0;
  std::int64_t classes = 0;
  std::int64_t k = 0;                    // topk: entries per row
  std::vector<std::int64_t> index;       // index: (rows); topk: (rows, k)
  std::vector<float> probability;        // probability: (rows, classes); topk: (rows, k)
  std::vector<std::int64_t> label;       // (rows) the most probable class (accuracy, NLL, ECE)
};

// One bad row found by validation.
struct row_problem {
  std::int64_t row;
  std::string message;  // "FILE:LINE: what is wrong"
};

// Finds the bad rows (does not throw for row problems; throws input_error when the table's
// shape itself does not fit the requested format). Returns the first `keep` of them, and
// stores how many there are in all in `*count` (when given): a file of millions of bad rows
// costs a counter, not a message per row.
std::vector<row_problem> find_target_problems(
    const table& t, const target_options& options,
    std::int64_t keep = std::numeric_limits<std::int64_t>::max(), std::int64_t* count = nullptr);

// Validates (input_error with the first problem) and converts.
targets interpret_targets(const table& t, const target_options& options);

// The form a table will be read as, for messages and check-targets.
target_kind resolve_kind(const table& t, const target_options& options);
const char* kind_name(target_kind kind);

}  // namespace softce::cli
