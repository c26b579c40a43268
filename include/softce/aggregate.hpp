// softce — soft labels from several noisy votes per item (crowd annotators, heuristic
// labelling functions): majority vote, vote fractions and Dawid–Skene.
//
// Votes come in one of two layouts:
//   wide  (items, annotators), row-major: the class id annotator j gave item i, or -1 for
//         "no vote";
//   long  `count` triples (item, annotator, label), one per vote (a repeated pair is counted
//         as two votes, as in crowd-kit).
// Class ids are in [0, classes). Every item needs at least one vote: an item without any is
// an error (its label would be a guess; drop the item or give it a vote). Sizes are
// overflow-checked; bad input throws softce::error naming the function, the argument and the
// position ("dawid_skene: votes: expected class ids in [-1, 10), got 12 at [3, 1]").
//
// Results do not depend on the thread count (softce::set_num_threads), to the last bit: items
// are independent in the E-step, the M-step sums each annotator's votes in item order, and the
// class totals are summed per fixed block of items, then over the blocks in order.
// Memory: O(items x classes) for the posteriors, O(votes) for two indexes of the votes, and
// O(annotators x classes^2) for the confusion matrices. Library code never prints: progress
// is a callback.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include <softce/softce.hpp>  // softce::error, set_num_threads

namespace softce::aggregate {

// (items, annotators) class ids, -1 = no vote, row-major.
struct wide_votes {
  const std::int64_t* labels = nullptr;
  std::int64_t items = 0;
  std::int64_t annotators = 0;
};

// One vote per index: item[v] got label[v] from annotator[v]. `items` / `annotators` of 0
// are inferred as max id + 1; when given, every id must be below them.
struct long_votes {
  const std::int64_t* item = nullptr;
  const std::int64_t* annotator = nullptr;
  const std::int64_t* label = nullptr;
  std::int64_t count = 0;
  std::int64_t items = 0;
  std::int64_t annotators = 0;
};

// Majority vote: per item, the class with the most votes; a tie goes to the LOWEST class id
// (crowd-kit's MajorityVote does the same: idxmax over the sorted labels). Returns (items).
std::vector<std::int64_t> majority(const wide_votes& votes, std::int64_t classes);
std::vector<std::int64_t> majority(const long_votes& votes, std::int64_t classes);

// Vote fractions: per item, votes for class k / votes. Returns (items, classes), row-major.
std::vector<double> vote_fractions(const wide_votes& votes, std::int64_t classes);
std::vector<double> vote_fractions(const long_votes& votes, std::int64_t classes);

struct dawid_skene_options {
  int max_iterations = 100;  // EM iterations (E-step + M-step) at most; >= 1
  // Stop when the log-likelihood per item improves by less than this from one iteration to
  // the next; 0 runs exactly max_iterations.
  double tolerance = 1e-5;
  // Added to every confusion count before normalising (0: maximum likelihood, as crowd-kit).
  double smoothing = 0.0;
  // Floor on the class priors (in the E-step) and on the confusion counts of the labels an
  // annotator used, before normalising — crowd-kit's 1e-10, which keeps every log finite.
  // 0 disables it (a class prior of 0 then stays 0).
  double floor = 1e-10;
  // Called after every iteration with (iteration, 1-based; log-likelihood per item).
  std::function<void(int, double)> on_iteration;
};

struct dawid_skene_result {
  std::int64_t items = 0, annotators = 0, classes = 0;
  std::vector<double> probabilities;  // (items, classes): the posterior of each item's class
  std::vector<double> priors;         // (classes): mean posterior (the final M-step)
  // (annotators, classes, classes): confusion[j][k][l] = P(annotator j votes l | true class
  // k), rows summing to 1 (an annotator without votes, or a class without posterior mass,
  // gets a uniform row).
  std::vector<double> confusion;
  std::vector<double> accuracy;       // (annotators): sum_k priors[k] * confusion[j][k][k]
  std::vector<std::int64_t> votes_per_annotator;  // (annotators)
  int iterations = 0;                 // iterations run
  bool converged = false;             // stopped by `tolerance` before max_iterations
  // log p(votes) under the parameters that produced `probabilities`, total and per item.
  double log_likelihood = 0;
  double log_likelihood_per_item = 0;
};

// Dawid & Skene (1979) EM, as crowd-kit's DawidSkene: start from the vote fractions, then
// M-step (priors = mean posterior; confusion = posterior-weighted vote counts, floored and
// smoothed, normalised per true class) and E-step (posterior ∝ prior_k · Π_votes
// confusion[j][k][label], in log space with the row maximum subtracted) in turns. After
// `iterations` E-steps the posteriors are returned, with the parameters of one last M-step.
dawid_skene_result dawid_skene(const wide_votes& votes, std::int64_t classes,
                               const dawid_skene_options& options = {});
dawid_skene_result dawid_skene(const long_votes& votes, std::int64_t classes,
                               const dawid_skene_options& options = {});

}  // namespace softce::aggregate
