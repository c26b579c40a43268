// softce._core: bindings of softce/aggregate.hpp (soft labels from noisy votes), used by
// softce/aggregate.py.
//
// The votes arrive as C-contiguous int64 arrays (aggregate.py converts), wide (items,
// annotators) or long (votes, 3) rows of (item, annotator, label). The results are NumPy
// arrays that own the library's vectors (moved, not copied): their sizes depend on ids that
// only the library validates, so Python cannot allocate them first. The library runs with
// the GIL released; a Dawid–Skene progress callback re-acquires it. softce::error becomes
// ValueError through the translator registered in bindings.cpp.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include <softce/aggregate.hpp>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

namespace nb = nanobind;
using namespace nb::literals;

namespace {

namespace agg = softce::aggregate;

using votes_array = nb::ndarray<const std::int64_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

// The two layouts behind one argument: "wide" (items, annotators) or "long" (votes, 3).
struct votes_input {
  bool wide = true;
  std::vector<std::int64_t> item, annotator, label;  // long: the three columns
  agg::wide_votes w;
  agg::long_votes l;
};

votes_input make_votes(const votes_array& votes, const std::string& layout, std::int64_t items,
                       std::int64_t annotators) {
  votes_input v;
  const std::int64_t rows = static_cast<std::int64_t>(votes.shape(0));
  const std::int64_t cols = static_cast<std::int64_t>(votes.shape(1));
  if (layout == "wide") {
    v.w = {votes.data(), rows, cols};
    return v;
  }
  if (layout != "long")
    throw softce::error("aggregate: layout: expected 'wide' or 'long', got '" + layout + "'");
  if (cols != 3)
    throw softce::error("aggregate: votes: expected shape (votes, 3) of (item, annotator, "
                        "label) rows for layout 'long', got " + std::to_string(cols) + " columns");
  v.wide = false;
  v.item.resize(rows), v.annotator.resize(rows), v.label.resize(rows);
  const std::int64_t* p = votes.data();
  for (std::int64_t r = 0; r < rows; ++r) {
    v.item[r] = p[3 * r];
    v.annotator[r] = p[3 * r + 1];
    v.label[r] = p[3 * r + 2];
  }
  v.l = {v.item.data(), v.annotator.data(), v.label.data(), rows, items, annotators};
  return v;
}

// A NumPy array that owns `values` (moved onto the heap, freed with the array).
template <class T>
nb::ndarray<nb::numpy, T> to_numpy(std::vector<T>&& values, std::initializer_list<std::size_t> shape) {
  auto* owned = new std::vector<T>(std::move(values));
  nb::capsule owner(owned, [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
  return nb::ndarray<nb::numpy, T>(owned->data(), shape, owner);
}

nb::ndarray<nb::numpy, std::int64_t> majority(const votes_array& votes, const std::string& layout,
                                              std::int64_t items, std::int64_t annotators,
                                              std::int64_t classes) {
  votes_input v = make_votes(votes, layout, items, annotators);
  std::vector<std::int64_t> r;
  {
    nb::gil_scoped_release release;
    r = v.wide ? agg::majority(v.w, classes) : agg::majority(v.l, classes);
  }
  const std::size_t n = r.size();
  return to_numpy(std::move(r), {n});
}

nb::ndarray<nb::numpy, double> vote_fractions(const votes_array& votes, const std::string& layout,
                                              std::int64_t items, std::int64_t annotators,
                                              std::int64_t classes) {
  votes_input v = make_votes(votes, layout, items, annotators);
  std::vector<double> r;
  {
    nb::gil_scoped_release release;
    r = v.wide ? agg::vote_fractions(v.w, classes) : agg::vote_fractions(v.l, classes);
  }
  const std::size_t n = r.size() / static_cast<std::size_t>(classes);
  return to_numpy(std::move(r), {n, static_cast<std::size_t>(classes)});
}

nb::dict dawid_skene(const votes_array& votes, const std::string& layout, std::int64_t items,
                     std::int64_t annotators, std::int64_t classes, int max_iterations,
                     double tolerance, double smoothing, double floor, nb::object callback) {
  votes_input v = make_votes(votes, layout, items, annotators);
  agg::dawid_skene_options o;
  o.max_iterations = max_iterations;
  o.tolerance = tolerance;
  o.smoothing = smoothing;
  o.floor = floor;
  if (!callback.is_none())
    o.on_iteration = [&callback](int iteration, double log_likelihood) {
      nb::gil_scoped_acquire acquire;
      callback(iteration, log_likelihood);  // a Python exception propagates as python_error
    };
  agg::dawid_skene_result r;
  {
    nb::gil_scoped_release release;
    r = v.wide ? agg::dawid_skene(v.w, classes, o) : agg::dawid_skene(v.l, classes, o);
  }
  const auto N = static_cast<std::size_t>(r.items), A = static_cast<std::size_t>(r.annotators),
             C = static_cast<std::size_t>(r.classes);
  nb::dict d;
  d["probabilities"] = to_numpy(std::move(r.probabilities), {N, C});
  d["priors"] = to_numpy(std::move(r.priors), {C});
  d["confusion"] = to_numpy(std::move(r.confusion), {A, C, C});
  d["accuracy"] = to_numpy(std::move(r.accuracy), {A});
  d["votes_per_annotator"] = to_numpy(std::move(r.votes_per_annotator), {A});
  d["iterations"] = r.iterations;
  d["converged"] = r.converged;
  d["log_likelihood"] = r.log_likelihood;
  d["log_likelihood_per_item"] = r.log_likelihood_per_item;
  return d;
}

}  // namespace

void bind_aggregate(nb::module_& m) {
  m.def("aggregate_majority", &majority, "votes"_a.noconvert(), "layout"_a, "items"_a,
        "annotators"_a, "classes"_a);
  m.def("aggregate_vote_fractions", &vote_fractions, "votes"_a.noconvert(), "layout"_a,
        "items"_a, "annotators"_a, "classes"_a);
  m.def("aggregate_dawid_skene", &dawid_skene, "votes"_a.noconvert(), "layout"_a, "items"_a,
        "annotators"_a, "classes"_a, "max_iterations"_a, "tolerance"_a, "smoothing"_a,
        "floor"_a, "callback"_a.none());
}
