// softce CLI — `softce aggregate`: soft labels from several noisy votes per item.
//
// Reads a votes table (CSV/NPY/IDX, the readers and limits of `train`): wide, one row per
// item and one column per annotator holding a class id or -1 (no vote), or long, one row per
// vote (item, annotator, label). Every value is checked at its FILE:LINE / FILE: record R
// before anything is converted or sized from it; then the library (softce/aggregate.hpp)
// computes majority vote (one-hot rows), vote fractions or Dawid–Skene posteriors, and the
// (items, classes) probabilities are written to --out, with a JSON report (the annotator
// estimates) beside it, both committed all or nothing. `softce train --targets` reads the
// output as it is.
#include <softce/aggregate.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "cli_error.hpp"
#include "commands.hpp"
#include "limits.hpp"
#include "outputs.hpp"
#include "table.hpp"

namespace softce::cli {

namespace {

std::string number(float v) {
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "%.9g", static_cast<double>(v));
  return buffer;
}

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Checks an id read as float32 (class, item or annotator): an integer in [0, 2^24) — float32
// holds every integer only up to 2^24 — and, for classes, below `classes` when given.
std::string id_problem(float v, const char* what, const std::string& column,
                       std::int64_t classes) {
  if (!std::isfinite(v) || v != std::floor(v) || v < 0)
    return std::string(what) + " " + number(v) + column + " is not a non-negative integer";
  if (v >= static_cast<float>(max_classes))
    return std::string(what) + " " + number(v) + column + " exceeds the limit of " +
           std::to_string(max_classes - 1);
  if (classes > 0 && v >= static_cast<float>(classes))
    return std::string(what) + " " + number(v) + column + " is out of range for " +
           std::to_string(classes) + " classes";
  return {};
}

struct parsed_votes {
  std::int64_t items = 0, annotators = 0, classes = 0, count = 0;
  std::vector<std::int64_t> wide;                    // (items, annotators)
  std::vector<std::int64_t> item, annotator, label;  // long
  bool is_wide = true;
};

void check_sizes(const table& t, const parsed_votes& v) {
  if (v.items > max_aggregate_values / v.classes)
    throw input_error(t.path + ": " + std::to_string(v.items) + " items x " +
                      std::to_string(v.classes) + " classes exceed the limit of " +
                      std::to_string(max_aggregate_values) + " values");
  if (v.annotators > max_aggregate_values / v.classes / v.classes)
    throw input_error(t.path + ": " + std::to_string(v.annotators) + " annotators x " +
                      std::to_string(v.classes) + "^2 classes of confusion matrices exceed the "
                      "limit of " + std::to_string(max_aggregate_values) + " values");
}

parsed_votes parse_votes(const table& t, const std::string& format, std::int64_t classes) {
  parsed_votes v;
  if (t.rows == 0) throw input_error(t.path + ": no votes (the table has no rows)");
  if (format == "wide") {
    v.items = t.rows;
    v.annotators = t.cols;
    std::int64_t max_label = -1;
    for (std::int64_t r = 0; r < t.rows; ++r) {
      bool any = false;
      for (std::int64_t c = 0; c < t.cols; ++c) {
        const float x = t.at(r, c);
        const std::string column = t.cols > 1 ? " in column " + std::to_string(c + 1) : "";
        if (x == -1.0f) continue;
        if (std::string p = id_problem(x, "vote", column, classes); !p.empty())
          throw input_error(t.where(r) + ": " + p +
                            (x < 0 && std::isfinite(x) && x == std::floor(x)
                                 ? " (class ids are 0, 1, ...; -1 is no vote)"
                                 : ""));
        any = true;
        max_label = std::max<std::int64_t>(max_label, static_cast<std::int64_t>(x));
      }
      if (!any)
        throw input_error(t.where(r) + ": no votes in this row (every item needs at least one "
                          "vote; -1 is no vote)");
    }
    v.classes = classes > 0 ? classes : max_label + 1;
  } else if (format == "long") {
    v.is_wide = false;
    if (t.cols != 3)
      throw input_error(t.path + ": long votes need 3 columns (item, annotator, label), the "
                        "file has " + std::to_string(t.cols));
    std::int64_t max_item = -1, max_annotator = -1, max_label = -1;
    const char* names[3] = {"item id", "annotator id", "label"};
    for (std::int64_t r = 0; r < t.rows; ++r) {
      for (int c = 0; c < 3; ++c)
        if (std::string p = id_problem(t.at(r, c), names[c], " in column " + std::to_string(c + 1),
                                       c == 2 ? classes : 0);
            !p.empty())
          throw input_error(t.where(r) + ": " + p);
      max_item = std::max<std::int64_t>(max_item, static_cast<std::int64_t>(t.at(r, 0)));
      max_annotator = std::max<std::int64_t>(max_annotator, static_cast<std::int64_t>(t.at(r, 1)));
      max_label = std::max<std::int64_t>(max_label, static_cast<std::int64_t>(t.at(r, 2)));
    }
    v.items = max_item + 1;
    v.annotators = max_annotator + 1;
    v.classes = classes > 0 ? classes : max_label + 1;
    v.count = t.rows;
  } else {
    throw input_error("--votes-format must be wide or long, not '" + format + "'");
  }
  if (v.classes < 2)
    throw input_error(t.path + ": every vote is class 0, so the number of classes cannot be "
                      "inferred; pass --classes (at least 2)");
  check_sizes(t, v);
  if (v.is_wide) {
    v.wide.resize(static_cast<std::size_t>(t.rows * t.cols));
    for (std::int64_t i = 0; i < t.rows * t.cols; ++i)
      v.wide[i] = static_cast<std::int64_t>(t.values[i]);
    return v;
  }
  std::vector<char> has_vote(static_cast<std::size_t>(v.items), 0);
  v.item.resize(v.count);
  v.annotator.resize(v.count);
  v.label.resize(v.count);
  for (std::int64_t r = 0; r < t.rows; ++r) {
    v.item[r] = static_cast<std::int64_t>(t.at(r, 0));
    v.annotator[r] = static_cast<std::int64_t>(t.at(r, 1));
    v.label[r] = static_cast<std::int64_t>(t.at(r, 2));
    has_vote[v.item[r]] = 1;
  }
  for (std::int64_t i = 0; i < v.items; ++i)
    if (!has_vote[i])
      throw input_error(t.path + ": item " + std::to_string(i) + " has no votes (items are "
                        "numbered 0 ... " + std::to_string(v.items - 1) + " by the largest item "
                        "id; every item needs at least one vote)");
  return v;
}

}  // namespace

int run_aggregate(const aggregate_args& a) {
  if (a.method != "dawid-skene" && a.method != "vote-fractions" && a.method != "majority")
    throw input_error("--method must be dawid-skene, vote-fractions or majority, not '" +
                      a.method + "'");
  if (a.votes_format != "wide" && a.votes_format != "long")
    throw input_error("--votes-format must be wide or long, not '" + a.votes_format + "'");
  if (a.progress != "auto" && a.progress != "lines" && a.progress != "none")
    throw input_error("--progress must be auto, lines or none, not '" + a.progress + "'");
  const int threads = set_threads(a.threads);

  // input
  const table t = load_table(a.votes);
  throw_if_interrupted();
  const parsed_votes v = parse_votes(t, a.votes_format, a.classes);
  const std::int64_t N = v.items, A = v.annotators, C = v.classes;

  // output location: --out and its report (same directory, one commit)
  if (std::filesystem::is_directory(a.out))
    throw input_error(a.out + ": is a directory (--out names the output file)");
  const std::filesystem::path out_path(a.out);
  const std::string name = out_path.filename().string();
  if (name.empty()) throw input_error(a.out + ": --out must name a file");
  if (ends_with(lower(name), ".json"))
    throw input_error(a.out + ": --out must not end in .json (the report is written as "
                      "NAME.json beside it)");
  const std::string report_name = out_path.stem().string() + ".json";
  require_replaceable(a.out);
  staged_outputs out(out_path.parent_path().string(), false);
  out.claim(name);
  out.claim(report_name);

  // compute
  namespace agg = softce::aggregate;
  const agg::wide_votes wide{v.wide.data(), N, A};
  const agg::long_votes lng{v.item.data(), v.annotator.data(), v.label.data(), v.count, N, A};
  const auto start = std::chrono::steady_clock::now();
  std::vector<double> probabilities;
  std::vector<std::int64_t> majority = v.is_wide ? agg::majority(wide, C) : agg::majority(lng, C);
  nlohmann::json report;
  report["format"] = "softce-aggregate";
  report["version"] = 1;
  report["method"] = a.method;
  report["votes"] = a.votes;
  report["votes_format"] = a.votes_format;
  report["output"] = name;
  report["items"] = N;
  report["annotators"] = A;
  report["classes"] = C;
  report["threads"] = threads;
  std::vector<std::int64_t> votes_per_annotator(A, 0), agree(A, 0);
  const auto each_vote = [&](auto&& f) {
    if (v.is_wide) {
      for (std::int64_t i = 0; i < N; ++i)
        for (std::int64_t j = 0; j < A; ++j)
          if (v.wide[i * A + j] >= 0) f(i, j, v.wide[i * A + j]);
    } else {
      for (std::int64_t r = 0; r < v.count; ++r) f(v.item[r], v.annotator[r], v.label[r]);
    }
  };
  each_vote([&](std::int64_t i, std::int64_t j, std::int64_t l) {
    ++votes_per_annotator[j];
    agree[j] += l == majority[i];
  });
  report["votes_count"] = v.is_wide ? [&] {
    std::int64_t n = 0;
    for (auto c : votes_per_annotator) n += c;
    return n;
  }() : v.count;

  nlohmann::json annotators = nlohmann::json::array();
  if (a.method == "dawid-skene") {
    agg::dawid_skene_options o;
    o.max_iterations = a.max_iterations;
    o.tolerance = a.tolerance;
    o.smoothing = a.smoothing;
    double previous = NAN;
    o.on_iteration = [&](int it, double ll) {
      if (a.progress != "none") {
        if (std::isnan(previous))
          std::fprintf(stderr, "dawid-skene iteration %d/%d  log-likelihood/item %.6f\n", it,
                       a.max_iterations, ll);
        else
          std::fprintf(stderr, "dawid-skene iteration %d/%d  log-likelihood/item %.6f  change %.3g\n",
                       it, a.max_iterations, ll, ll - previous);
      }
      previous = ll;
    };
    agg::dawid_skene_result r = v.is_wide ? agg::dawid_skene(wide, C, o) : agg::dawid_skene(lng, C, o);
    probabilities = std::move(r.probabilities);
    report["dawid_skene"] = {{"iterations", r.iterations},
                             {"converged", r.converged},
                             {"max_iterations", a.max_iterations},
                             {"tolerance", a.tolerance},
                             {"smoothing", a.smoothing},
                             {"floor", o.floor},
                             {"initialisation", "vote fractions"},
                             {"log_likelihood", r.log_likelihood},
                             {"log_likelihood_per_item", r.log_likelihood_per_item},
                             {"priors", r.priors}};
    for (std::int64_t j = 0; j < A; ++j) {
      nlohmann::json confusion = nlohmann::json::array();
      for (std::int64_t k = 0; k < C; ++k)
        confusion.push_back(std::vector<double>(r.confusion.begin() + (j * C + k) * C,
                                                r.confusion.begin() + (j * C + k + 1) * C));
      annotators.push_back({{"annotator", j},
                            {"votes", votes_per_annotator[j]},
                            {"agreement_with_majority",
                             votes_per_annotator[j] ? double(agree[j]) / double(votes_per_annotator[j]) : 0.0},
                            {"accuracy", r.accuracy[j]},
                            {"confusion", confusion}});
    }
  } else {
    if (a.method == "vote-fractions") {
      probabilities = v.is_wide ? agg::vote_fractions(wide, C) : agg::vote_fractions(lng, C);
    } else {
      probabilities.assign(static_cast<std::size_t>(N * C), 0.0);
      for (std::int64_t i = 0; i < N; ++i) probabilities[i * C + majority[i]] = 1.0;
    }
    for (std::int64_t j = 0; j < A; ++j)
      annotators.push_back({{"annotator", j},
                            {"votes", votes_per_annotator[j]},
                            {"agreement_with_majority",
                             votes_per_annotator[j] ? double(agree[j]) / double(votes_per_annotator[j]) : 0.0}});
  }
  report["annotator_estimates"] = annotators;
  report["seconds"] =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (a.method == "dawid-skene") {
    std::int64_t same = 0;
    for (std::int64_t i = 0; i < N; ++i) {
      const double* p = &probabilities[i * C];
      same += std::max_element(p, p + C) - p == majority[i];
    }
    report["dawid_skene"]["agreement_with_majority"] = N ? double(same) / double(N) : 0.0;
  }

  // write: float32 rows (the form `train --targets` reads)
  std::vector<float> rows(probabilities.begin(), probabilities.end());
  out.write(name, ends_with(lower(name), ".npy") ? npy_bytes(rows.data(), N, C)
                                                 : csv_bytes(rows.data(), N, C));
  out.write(report_name, report.dump(2) + "\n");
  out.commit();
  if (a.progress != "none")
    std::fprintf(stderr, "wrote %s and %s (%lld items, %lld annotators, %lld classes)\n",
                 out.final_path(name).c_str(), out.final_path(report_name).c_str(),
                 static_cast<long long>(N), static_cast<long long>(A), static_cast<long long>(C));
  return 0;
}

}  // namespace softce::cli
