// Unit tests of target interpretation and validation (tools/targets.hpp).
#include "targets.hpp"

#include <gtest/gtest.h>

#include "cli_error.hpp"

using namespace softce::cli;

namespace {

template <class F>
std::string error_of(F f) {
  try {
    f();
  } catch (const input_error& e) {
    return e.what();
  }
  return "";
}

table csv(const std::string& text, const char* name = "t.csv") {
  read_options o;
  o.allow_nonfinite = true;
  return parse_csv(text, name, o);
}

}  // namespace

TEST(targets, class_indices) {
  targets t = interpret_targets(csv("y\n0\n2\n1\n"), {});
  EXPECT_EQ(t.kind, target_kind::index);
  EXPECT_EQ(t.classes, 3);
  EXPECT_EQ(t.index, (std::vector<std::int64_t>{0, 2, 1}));
  EXPECT_EQ(t.label, t.index);
  target_options o;
  o.classes = 5;
  EXPECT_EQ(interpret_targets(csv("0\n1\n"), o).classes, 5);
}

TEST(targets, class_index_errors) {
  EXPECT_EQ(error_of([] { interpret_targets(csv("0\n1.5\n"), {}); }),
            "t.csv:2: class index 1.5 is not a non-negative integer");
  EXPECT_EQ(error_of([] { interpret_targets(csv("0\n-1\n"), {}); }),
            "t.csv:2: class index -1 is not a non-negative integer");
  target_options o;
  o.classes = 3;
  EXPECT_EQ(error_of([&] { interpret_targets(csv("0\n3\n"), o); }),
            "t.csv:2: class index 3 is out of range for 3 classes");
  EXPECT_EQ(error_of([] { interpret_targets(csv("0\n0\n"), {}); }),
            "t.csv: the targets name only 1 class; at least 2 are needed (pass --classes if some "
            "are absent)");
}

TEST(targets, probabilities) {
  targets t = interpret_targets(csv("0.2,0.8\n1,0\n0.5,0.5\n"), {});
  EXPECT_EQ(t.kind, target_kind::probability);
  EXPECT_EQ(t.classes, 2);
  EXPECT_EQ(t.label, (std::vector<std::int64_t>{1, 0, 0}));  // ties: first class
}

TEST(targets, probability_errors_and_tolerance) {
  EXPECT_EQ(error_of([] { interpret_targets(csv("0.5,0.5\n-0.1,1.1\n"), {}); }),
            "t.csv:2: negative probability -0.1 in column 1");
  EXPECT_EQ(error_of([] { interpret_targets(csv("0.5,0.5\n0.5,nan\n"), {}); }),
            "t.csv:2: non-finite probability nan in column 2");
  EXPECT_EQ(error_of([] { interpret_targets(csv("0.5,0.5\n0.6,0.6\n"), {}); }),
            "t.csv:2: probabilities sum to 1.2 (tolerance 0.001; --normalize rescales rows)");
  // within tolerance: accepted as given
  EXPECT_NO_THROW(interpret_targets(csv("0.3333,0.3333,0.3333\n"), {}));
  target_options o;
  o.normalize = true;
  targets t = interpret_targets(csv("1,3\n"), o);
  EXPECT_FLOAT_EQ(t.probability[0], 0.25f);
  EXPECT_EQ(error_of([&] { interpret_targets(csv("0,0\n"), o); }),
            "t.csv:1: probabilities sum to 0; cannot normalize");
  o = {};
  o.classes = 3;
  EXPECT_EQ(error_of([&] { interpret_targets(csv("0.5,0.5\n"), o); }),
            "t.csv: 2 probability columns but 3 classes");
}

TEST(targets, every_bad_row_is_found) {
  auto problems = find_target_problems(csv("p,q\n0.5,0.5\n-1,2\n0.5,0.5\nnan,0\n0.9,0.9\n"), {});
  ASSERT_EQ(problems.size(), 3u);
  EXPECT_EQ(problems[0].message, "t.csv:3: negative probability -1 in column 1");
  EXPECT_EQ(problems[1].message, "t.csv:5: non-finite probability nan in column 1");
  EXPECT_EQ(problems[2].message,
            "t.csv:6: probabilities sum to 1.8 (tolerance 0.001; --normalize rescales rows)");
}

TEST(targets, topk) {
  target_options o;
  o.format = "topk";
  o.classes = 5;
  targets t = interpret_targets(csv("3,1,0.6,0.3\n0,4,0.1,0.9\n"), o);
  EXPECT_EQ(t.kind, target_kind::topk);
  EXPECT_EQ(t.k, 2);
  EXPECT_EQ(t.index, (std::vector<std::int64_t>{3, 1, 0, 4}));
  EXPECT_EQ(t.label, (std::vector<std::int64_t>{3, 4}));
  EXPECT_EQ(error_of([&] { interpret_targets(csv("1,1,0.5,0.5\n"), o); }),
            "t.csv:1: duplicate class index 1 in columns 1 and 2");
  EXPECT_EQ(error_of([&] { interpret_targets(csv("1,7,0.5,0.5\n"), o); }),
            "t.csv:1: class index 7 in column 2 is out of range for 5 classes");
  EXPECT_EQ(error_of([&] { interpret_targets(csv("1,2,0.7,0.5\n"), o); }),
            "t.csv:1: probabilities sum to 1.2, over 1 (tolerance 0.001; --normalize rescales "
            "rows)");
  EXPECT_EQ(error_of([&] { interpret_targets(csv("1,2,3\n"), o); }),
            "t.csv: top-k targets need 2K columns (K indices, K probabilities), the file has 3");
}

TEST(targets, format_option) {
  target_options o;
  o.format = "index";
  EXPECT_EQ(error_of([&] { interpret_targets(csv("0,1\n"), o); }),
            "t.csv: class-index targets need 1 column, the file has 2");
  o.format = "probs";
  EXPECT_EQ(error_of([&] { interpret_targets(csv("0\n1\n"), o); }),
            "t.csv: probability targets need one column per class (at least 2), the file has 1");
  o.format = "bogus";
  EXPECT_EQ(error_of([&] { interpret_targets(csv("0\n1\n"), o); }),
            "unknown targets format 'bogus' (expected auto, index, probs or topk)");
}

TEST(targets, class_indices_beyond_the_limit_are_refused_before_the_cast) {
  // 2^24 and up (float32 holds every integer only up to 2^24), 2^63 and 1e30 (beyond int64)
  EXPECT_EQ(error_of([] { interpret_targets(csv("0\n16777215\n16777216\n"), {}); }),
            "t.csv:3: class index 16777216 exceeds the limit of 16777215 (at most 16777216 "
            "classes)");
  EXPECT_EQ(error_of([] { interpret_targets(csv("0\n9.2233720368547758e18\n"), {}); }),
            "t.csv:2: class index 9.223372e+18 exceeds the limit of 16777215 (at most 16777216 "
            "classes)");
  const auto problems = find_target_problems(csv("1e30\n1\n3e9\n"), {});
  ASSERT_EQ(problems.size(), 2u);
  EXPECT_EQ(problems[0].message,
            "t.csv:1: class index 1e+30 exceeds the limit of 16777215 (at most 16777216 classes)");
  EXPECT_EQ(problems[1].row, 2);
  target_options topk;
  topk.format = "topk";
  EXPECT_EQ(error_of([&] { interpret_targets(csv("0,3e9,0.5,0.5\n"), topk); }),
            "t.csv:1: class index 3e+09 in column 2 exceeds the limit of 16777215 (at most "
            "16777216 classes)");
}

TEST(targets, topk_first_problem_in_column_order) {
  target_options topk;
  topk.format = "topk";
  // a repeat before a bad index is reported, and the other way round
  EXPECT_EQ(error_of([&] { interpret_targets(csv("4,2,4,-1,0.1,0.1,0.1,0.1\n"), topk); }),
            "t.csv:1: duplicate class index 4 in columns 1 and 3");
  EXPECT_EQ(error_of([&] { interpret_targets(csv("4,-1,4,2,0.1,0.1,0.1,0.1\n"), topk); }),
            "t.csv:1: class index -1 in column 2 is not a non-negative integer");
  // the smallest repeating column, paired with the first column of its value
  EXPECT_EQ(error_of([&] { interpret_targets(csv("7,5,5,7,5,0.1,0.1,0.1,0.1,0.1\n"), topk); }),
            "t.csv:1: duplicate class index 5 in columns 2 and 3");
}
