// Tests of the cross-rank agreement protocol (class_parallel.hpp: describe, agree, run,
// shard_from_local_classes, fingerprint) over an in-process fake transport: P threads, one
// per rank, exchanging through shared memory at a barrier. Each case runs one call per rank
// and checks what every rank saw (the same message everywhere; the failing rank its own
// error). The fronts (softce::mpi, torch.distributed) are tested in tests/mpi and
// python/tests/test_distributed.py on the same messages (tests/mpi/agreement_cases.txt).
#include <softce/class_parallel.hpp>

#include <gtest/gtest.h>

#include <barrier>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <thread>
#include <vector>

namespace {

namespace cp = softce::class_parallel;
using softce::array_view;
using ce = softce::cross_entropy_options;

// P ranks in one process. Every collective: write this rank's part, wait, read, wait.
class fake_group {
 public:
  explicit fake_group(int size) : size_(size), sync_(size), slots_(static_cast<std::size_t>(size)) {}

  cp::transport transport(int rank, cp::reduce_mode mode = cp::reduce_mode::ordered) {
    cp::transport t;
    t.rank = rank;
    t.size = size_;
    t.mode = mode;
    // element-wise MAX / SUM over the ranks, in rank order (the same bits on every rank)
    auto elementwise = [this, rank](double* values, std::int64_t count, bool max) {
      std::vector<std::int64_t> bits(static_cast<std::size_t>(count));
      std::memcpy(bits.data(), values, static_cast<std::size_t>(count) * 8);
      slots_[static_cast<std::size_t>(rank)] = bits;
      sync_.arrive_and_wait();
      for (std::int64_t i = 0; i < count; ++i) {
        double acc = reinterpret_cast<const double*>(slots_[0].data())[i];
        for (int r = 1; r < size_; ++r) {
          const double v = reinterpret_cast<const double*>(slots_[static_cast<std::size_t>(r)].data())[i];
          acc = max ? std::fmax(acc, v) : acc + v;
        }
        values[i] = acc;
      }
      sync_.arrive_and_wait();
    };
    t.all_reduce_max = [elementwise](double* v, std::int64_t n) { elementwise(v, n, true); };
    t.all_reduce_sum = [elementwise](double* v, std::int64_t n) { elementwise(v, n, false); };
    t.all_gather = [this, rank](const std::int64_t* mine, std::int64_t count, std::int64_t* all) {
      ++gathers_[static_cast<std::size_t>(rank)];
      slots_[static_cast<std::size_t>(rank)].assign(mine, mine + count);
      sync_.arrive_and_wait();
      for (int r = 0; r < size_; ++r)
        std::memcpy(all + r * count, slots_[static_cast<std::size_t>(r)].data(), static_cast<std::size_t>(count) * 8);
      sync_.arrive_and_wait();
    };
    t.broadcast = [this, rank](char* bytes, std::int64_t count, int root) {
      if (rank == root) message_.assign(bytes, bytes + count);
      sync_.arrive_and_wait();
      std::memcpy(bytes, message_.data(), static_cast<std::size_t>(count));
      sync_.arrive_and_wait();
    };
    t.all_reduce = [this, rank](double* records, std::int64_t count, int width, softce::row_stats_merge_fn merge) {
      const std::size_t n = static_cast<std::size_t>(count * width);
      std::vector<std::int64_t> bits(n);
      std::memcpy(bits.data(), records, n * 8);
      slots_[static_cast<std::size_t>(rank)] = bits;
      sync_.arrive_and_wait();
      std::memcpy(records, slots_[0].data(), n * 8);
      for (int r = 1; r < size_; ++r)
        merge(records, reinterpret_cast<const double*>(slots_[static_cast<std::size_t>(r)].data()), count);
      sync_.arrive_and_wait();
    };
    return t;
  }

  // Runs body(rank, transport) on every rank; returns each rank's error message ("" if none).
  std::vector<std::string> run(const std::function<void(int, const cp::transport&)>& body,
                               const std::function<cp::reduce_mode(int)>& mode = {}) {
    std::vector<std::string> messages(static_cast<std::size_t>(size_));
    std::vector<std::thread> threads;
    for (int r = 0; r < size_; ++r)
      threads.emplace_back([&, r] {
        const cp::transport t = transport(r, mode ? mode(r) : cp::reduce_mode::ordered);
        try {
          body(r, t);
        } catch (const std::exception& e) {
          messages[static_cast<std::size_t>(r)] = e.what();
        }
      });
    for (auto& t : threads) t.join();
    return messages;
  }

  int gathers(int rank) const { return gathers_[static_cast<std::size_t>(rank)]; }

 private:
  int size_;
  std::barrier<> sync_;
  std::vector<std::vector<std::int64_t>> slots_;
  std::vector<char> message_;
  int gathers_[8] = {};
};

constexpr std::int64_t N = 4, C = 10;

// The same on every rank: N rows of global data; each rank slices its own classes.
struct problem {
  std::vector<float> x = std::vector<float>(N * C);
  std::vector<double> xd = std::vector<double>(N * C);
  std::vector<std::int64_t> y = {0, 3, 9, 5};
  std::vector<float> w = std::vector<float>(C, 1.5f);
  bool mask[N] = {true, false, true, true};
  problem() {
    for (std::int64_t i = 0; i < N * C; ++i) x[i] = static_cast<float>(std::sin(0.7 * i)), xd[i] = x[i];
  }
  // rank r of P ranks: classes [lo, hi), even split
  static std::int64_t lo(int r, int P) { return r * C / P; }
  array_view shard(int r, int P) const {
    return softce::view(x.data() + lo(r, P), {N, lo(r + 1, P) - lo(r, P)}, {C, 1});
  }
  array_view shard_double(int r, int P) const {
    return softce::view(xd.data() + lo(r, P), {N, lo(r + 1, P) - lo(r, P)}, {C, 1});
  }
};

void expect_everywhere(const std::vector<std::string>& messages, const std::string& want) {
  for (std::size_t r = 0; r < messages.size(); ++r) EXPECT_EQ(messages[r], want) << "rank " << r;
}

// One agreement step: every rank describes its call with `change` applied on the last rank.
std::vector<std::string> agree_with_change(
    int P, const std::function<cp::call_description(int rank, bool last)>& describe) {
  fake_group group(P);
  return group.run([&](int r, const cp::transport& t) { cp::agree(t, describe(r, r == P - 1)); });
}

TEST(Agreement, AllAgreeAndTheLossIsTheSingleProcessOne) {
  const problem p;
  for (int P : {1, 2, 3}) {
    fake_group group(P);
    std::vector<double> losses(static_cast<std::size_t>(P));
    const auto messages = group.run([&](int r, const cp::transport& t) {
      softce::cross_entropy_options o;
      o.label_smoothing = 0.1;
      o.weight = softce::view(p.w.data() + problem::lo(r, P), {problem::lo(r + 1, P) - problem::lo(r, P)});
      const array_view x = p.shard(r, P), y = softce::view(p.y.data(), {N});
      const auto call = cp::describe("f", problem::lo(r, P), C, x, y, o);
      losses[static_cast<std::size_t>(r)] =
          cp::run(t, call, [&](const softce::class_shard& s) { return cp::cross_entropy(s, x, y, o); });
    });
    expect_everywhere(messages, "");
    softce::cross_entropy_options o;
    o.label_smoothing = 0.1;
    o.weight = softce::view(p.w.data(), {C});
    const double single = softce::cross_entropy(softce::view(p.x.data(), {N, C}), softce::view(p.y.data(), {N}), o);
    for (int r = 0; r < P; ++r) {
      EXPECT_NEAR(losses[static_cast<std::size_t>(r)], single, 1e-6 * std::abs(single)) << P << " ranks";
      EXPECT_EQ(losses[static_cast<std::size_t>(r)], losses[0]);
      EXPECT_EQ(group.gathers(r), 1) << "one agreement per call";
    }
  }
}

// The drifted cases first: the MPI front used to compare neither of these.
TEST(Agreement, WeightGivenOnOneRankOnly) {
  const problem p;
  const auto messages = agree_with_change(3, [&](int r, bool last) {
    softce::cross_entropy_options o;
    if (!last) o.weight = softce::view(p.w.data(), {problem::lo(r + 1, 3) - problem::lo(r, 3)});
    return cp::describe("f", problem::lo(r, 3), C, p.shard(r, 3), softce::view(p.y.data(), {N}), o);
  });
  expect_everywhere(messages, "f: weight differs across ranks (rank 0: given, rank 2: not given)");
}

TEST(Agreement, DtypeDiffers) {
  const problem p;
  auto messages = agree_with_change(2, [&](int r, bool last) {
    return cp::describe("f", problem::lo(r, 2), C, last ? p.shard_double(r, 2) : p.shard(r, 2),
                        softce::view(p.y.data(), {N}), ce{});
  });
  expect_everywhere(messages, "f: input dtype differs across ranks (rank 0: 'float32', rank 1: 'float64')");
  messages = agree_with_change(2, [&](int r, bool last) {
    const array_view s = last ? p.shard_double(r, 2) : p.shard(r, 2);
    return cp::describe("g", problem::lo(r, 2), C, s, s, softce::distillation_options{});
  });
  expect_everywhere(messages, "g: student_logits dtype differs across ranks (rank 0: 'float32', rank 1: 'float64')");
}

TEST(Agreement, ShapesShardsAndFunctions) {
  const problem p;
  const array_view y = softce::view(p.y.data(), {N});
  auto messages = agree_with_change(2, [&](int r, bool last) {
    const std::int64_t n = last ? N - 1 : N, c = problem::lo(r + 1, 2) - problem::lo(r, 2);
    return cp::describe("f", problem::lo(r, 2), C, softce::view(p.x.data() + problem::lo(r, 2), {n, c}, {C, 1}),
                        softce::view(p.y.data(), {n}), ce{});
  });
  expect_everywhere(messages, "f: input: rows differ across ranks (rank 0: 4, rank 1: 3)");
  messages = agree_with_change(2, [&](int r, bool last) {
    const std::int64_t c = problem::lo(r + 1, 2) - problem::lo(r, 2);
    const array_view x = last ? softce::view(p.x.data(), {2, c, 2}) : softce::view(p.x.data(), {4, c, 1});
    return cp::describe("f", problem::lo(r, 2), C, x, softce::view(p.y.data(), last ? std::initializer_list<std::int64_t>{2, 2} : std::initializer_list<std::int64_t>{4, 1}), ce{});
  });
  expect_everywhere(messages, "f: input: row shape differs across ranks (rank 0: (4, 1), rank 1: (2, 2))");
  messages = agree_with_change(2, [&](int r, bool last) {
    return cp::describe("f", problem::lo(r, 2), last ? C + 1 : C, p.shard(r, 2), y, ce{});
  });
  expect_everywhere(messages, "f: num_classes differs across ranks (rank 0: 10, rank 1: 11)");
  messages = agree_with_change(2, [&](int r, bool last) {
    return cp::describe("f", last ? 6 : 0, C, p.shard(r, 2), y, ce{});
  });
  expect_everywhere(messages,
                    "f: shard: expected the ranks' classes to tile [0, 10) in rank order, but rank 1 has classes "
                    "[6, 11) (expected a start at 5)");
  messages = agree_with_change(2, [&](int r, bool) { return cp::describe("f", problem::lo(r, 2), C + 2, p.shard(r, 2), y, ce{}); });
  expect_everywhere(messages, "f: shard: expected the ranks' classes to tile [0, 12) in rank order, but they cover [0, 10)");
  messages = agree_with_change(2, [&](int r, bool last) {
    if (last) return cp::describe("f", problem::lo(r, 2), C, p.shard(r, 2), p.shard(r, 2), softce::distillation_options{});
    return cp::describe("f", problem::lo(r, 2), C, p.shard(r, 2), y, ce{});
  });
  expect_everywhere(messages,
                    "f: ranks called different functions (rank 0: cross_entropy with class-index targets, rank 1: "
                    "distillation_loss with teacher logits)");
}

TEST(Agreement, Options) {
  const problem p;
  const array_view y = softce::view(p.y.data(), {N});
  auto ce_change = [&](const std::function<void(softce::cross_entropy_options&)>& change) {
    return agree_with_change(2, [&](int r, bool last) {
      softce::cross_entropy_options o;
      if (last) change(o);
      return cp::describe("f", problem::lo(r, 2), C, p.shard(r, 2), y, o);
    });
  };
  expect_everywhere(ce_change([](auto& o) { o.label_smoothing = 0.25; }),
                    "f: label_smoothing differs across ranks (rank 0: 0, rank 1: 0.25)");
  expect_everywhere(ce_change([](auto& o) { o.ignore_index = 7; }), "f: ignore_index differs across ranks (rank 0: -100, rank 1: 7)");
  expect_everywhere(ce_change([](auto& o) { o.reduce = softce::reduction::none; }),
                    "f: reduction differs across ranks (rank 0: 'mean', rank 1: 'none')");
  auto kd_change = [&](const std::function<void(softce::distillation_options&)>& change) {
    return agree_with_change(2, [&](int r, bool last) {
      softce::distillation_options o;
      if (last) change(o);
      return cp::describe("g", problem::lo(r, 2), C, p.shard(r, 2), p.shard(r, 2), o);
    });
  };
  expect_everywhere(kd_change([](auto& o) { o.temperature = 0.5; }), "g: temperature differs across ranks (rank 0: 1, rank 1: 0.5)");
  expect_everywhere(kd_change([](auto& o) { o.beta = 0.1; }), "g: beta differs across ranks (rank 0: 0.5, rank 1: 0.1)");
  expect_everywhere(kd_change([](auto& o) { o.kind = softce::divergence::reverse_kl; }),
                    "g: divergence differs across ranks (rank 0: 'kl', rank 1: 'reverse_kl')");
  expect_everywhere(kd_change([](auto& o) { o.dim = 1; }), "g: dim differs across ranks (rank 0: not given, rank 1: 1)");
  expect_everywhere(kd_change([&](auto& o) { o.mask = softce::view(p.mask, {N}); }),
                    "g: mask differs across ranks (rank 0: not given, rank 1: given)");
}

TEST(Agreement, ArraysThatMustBeIdentical) {
  const problem p;
  std::vector<std::int64_t> y2 = p.y;
  y2[2] = 1;
  auto messages = agree_with_change(3, [&](int r, bool last) {
    return cp::describe("f", problem::lo(r, 3), C, p.shard(r, 3), softce::view((last ? y2 : p.y).data(), {N}), ce{});
  });
  expect_everywhere(messages,
                    "f: target: differs between rank 0 and rank 2 (class indices and top-k entries are global and "
                    "must be identical on every rank)");
  std::vector<std::int64_t> idx = {0, 9, 1, 8, 2, 7, 3, 6}, idx2 = idx;
  idx2[5] = 5;
  std::vector<float> val(8, 0.5f);
  messages = agree_with_change(2, [&](int r, bool last) {
    const softce::topk t{softce::view((last ? idx2 : idx).data(), {N, 2}), softce::view(val.data(), {N, 2}), false};
    return cp::describe("g", problem::lo(r, 2), C, p.shard(r, 2), t, softce::distillation_options{});
  });
  expect_everywhere(messages,
                    "g: teacher: differs between rank 0 and rank 1 (class indices and top-k entries are global and "
                    "must be identical on every rank)");
  bool mask2[N] = {true, true, true, true};
  messages = agree_with_change(2, [&](int r, bool last) {
    softce::cross_entropy_options o;
    o.mask = softce::view(last ? mask2 : p.mask, {N});
    return cp::describe("f", problem::lo(r, 2), C, p.shard(r, 2), p.shard(r, 2), o);
  });
  expect_everywhere(messages, "f: mask: differs between rank 0 and rank 1 (the row mask must be identical on every rank)");
  // probability targets and teacher logits are per shard: different on every rank is fine
  messages = agree_with_change(2, [&](int r, bool) {
    return cp::describe("f", problem::lo(r, 2), C, p.shard(r, 2), p.shard(1 - r, 2), softce::cross_entropy_options{});
  });
  expect_everywhere(messages, "");
}

TEST(Agreement, AFailureOnOneRankIsEveryRanksError) {
  const problem p;
  const int P = 3;
  fake_group group(P);
  std::vector<int> failed_rank(P, -1);
  std::vector<std::int64_t> codes(P, -1);
  std::vector<softce::error_kind> kinds(P);
  const auto messages = group.run([&](int r, const cp::transport& t) {
    const array_view x = p.shard(r, P), y = softce::view(p.y.data(), {N});
    const auto call = cp::describe("f", problem::lo(r, P), C, x, y, ce{});
    try {
      cp::run(t, call, [&](const softce::class_shard& s) -> double {
        if (r >= 1) throw softce::error("own trouble on rank " + std::to_string(r), softce::error_kind::index);
        return cp::cross_entropy(s, x, y);
      });
    } catch (const cp::shard_failure& e) {
      failed_rank[r] = e.rank();
      codes[r] = e.code();
      kinds[r] = e.kind();
      throw;
    }
  });
  EXPECT_EQ(messages[0], "f: failed on rank 1: own trouble on rank 1");
  EXPECT_EQ(failed_rank[0], 1);
  EXPECT_EQ(codes[0], cp::failure_code(softce::error_kind::index));
  EXPECT_EQ(kinds[0], softce::error_kind::index);
  EXPECT_EQ(messages[1], "own trouble on rank 1");  // the failing ranks rethrow their own
  EXPECT_EQ(messages[2], "own trouble on rank 2");
}

TEST(Agreement, AFrontsOwnFailureCodeTravels) {
  // a front's own code (>= 3) reaches the others as is; its error_kind is value
  fake_group group(2);
  std::int64_t code = -1;
  softce::error_kind kind = softce::error_kind::index;
  const problem p;
  const auto messages = group.run([&](int r, const cp::transport& t) {
    const auto call = cp::describe("f", problem::lo(r, 2), C, p.shard(r, 2), softce::view(p.y.data(), {N}), ce{});
    if (r == 0) {
      const cp::local_failure mine{"not implemented here", 3};
      cp::agree(t, call, &mine);
      throw std::runtime_error("rank 0 rethrows its own");
    }
    try {
      cp::agree(t, call);
    } catch (const cp::shard_failure& e) {
      code = e.code();
      kind = e.kind();
      throw;
    }
  });
  EXPECT_EQ(messages[1], "f: failed on rank 0: not implemented here");
  EXPECT_EQ(code, 3);
  EXPECT_EQ(kind, softce::error_kind::value);
}

TEST(Agreement, ACoreWithoutCollectivesStillAgrees) {
  const problem p;
  fake_group group(2);
  const auto messages = group.run([&](int r, const cp::transport& t) {
    softce::cross_entropy_options o;
    o.label_smoothing = r == 1 ? 0.5 : 0.0;
    const auto call = cp::describe("f", problem::lo(r, 2), C, p.shard(r, 2), softce::view(p.y.data(), {N}), o);
    cp::run(t, call, [](const softce::class_shard&) { return 0.0; });
  });
  expect_everywhere(messages, "f: label_smoothing differs across ranks (rank 0: 0, rank 1: 0.5)");
}

TEST(Agreement, ShardFromLocalClasses) {
  fake_group group(3);
  std::vector<cp::shard_range> ranges(3);
  const std::int64_t counts[3] = {4, 0, 7};
  auto messages = group.run([&](int r, const cp::transport& t) {
    ranges[static_cast<std::size_t>(r)] = cp::shard_from_local_classes(t, "s", counts[r]);
  });
  expect_everywhere(messages, "");
  EXPECT_EQ(ranges[0].class_offset, 0);
  EXPECT_EQ(ranges[1].class_offset, 4);
  EXPECT_EQ(ranges[2].class_offset, 4);
  for (const auto& s : ranges) EXPECT_EQ(s.num_classes, 11);
  fake_group bad(3);
  messages = bad.run([&](int r, const cp::transport& t) { cp::shard_from_local_classes(t, "s", r == 2 ? -3 : 5); });
  expect_everywhere(messages, "s: local_classes: expected a count >= 0 on every rank, got -3 on rank 2");
  fake_group failing(2);
  messages = failing.run([&](int r, const cp::transport& t) {
    const cp::local_failure mine{"bad input", 2};
    cp::shard_from_local_classes(t, "s", 5, r == 1 ? &mine : nullptr);
    if (r == 1) throw std::runtime_error("bad input");
  });
  EXPECT_EQ(messages[0], "s: failed on rank 1: bad input");
  EXPECT_EQ(messages[1], "bad input");
}

TEST(Fingerprint, ValuesNotLayout) {
  const std::vector<std::int64_t> a = {1, 2, 3, 4, 5, 6};
  const std::vector<std::int64_t> transposed = {1, 4, 2, 5, 3, 6};  // a (2, 3) stored column-major
  const std::optional<array_view> row_major[1] = {softce::view(a.data(), {2, 3})};
  const std::optional<array_view> column_major[1] = {softce::view(transposed.data(), {2, 3}, {1, 2})};
  EXPECT_EQ(cp::fingerprint(row_major, 1), cp::fingerprint(column_major, 1));
  std::vector<std::int64_t> b = a;
  b[5] = 7;
  const std::optional<array_view> changed[1] = {softce::view(b.data(), {2, 3})};
  EXPECT_NE(cp::fingerprint(row_major, 1), cp::fingerprint(changed, 1));
  const std::optional<array_view> reshaped[1] = {softce::view(a.data(), {3, 2})};
  EXPECT_NE(cp::fingerprint(row_major, 1), cp::fingerprint(reshaped, 1));
  const std::vector<std::int32_t> narrow = {1, 2, 3, 4, 5, 6};
  const std::optional<array_view> other_dtype[1] = {softce::view(narrow.data(), {2, 3})};
  EXPECT_NE(cp::fingerprint(row_major, 1), cp::fingerprint(other_dtype, 1));
  const std::optional<array_view> absent[1] = {std::nullopt};
  const std::optional<array_view> empty[1] = {softce::view(a.data(), {0})};
  EXPECT_NE(cp::fingerprint(absent, 1), cp::fingerprint(empty, 1));
}

TEST(Agreement, TransportWithoutCollectivesIsAnError) {
  const problem p;
  cp::transport t;
  const auto call = cp::describe("f", 0, C, p.shard(0, 1), softce::view(p.y.data(), {N}), ce{});
  try {
    cp::agree(t, call);
    FAIL() << "no error";
  } catch (const softce::error& e) {
    EXPECT_STREQ(e.what(), "f: transport: expected 0 <= rank < size, all_gather and broadcast, got rank 0 of 1");
  }
}



// One rank's class-parallel call for the reduce-mode tests: kind 0 index targets, 1 top-k
// with a tail, 2 / 3 / 4 distillation kl / reverse_kl / jsd against the teacher slice zs.
double run_kind(int kind, const cp::transport& t, std::int64_t lo, const array_view& x, const array_view& y,
                const softce::topk& tk, const array_view& zs, const softce::cross_entropy_options& o,
                softce::distillation_options d, const softce::outputs& out) {
  d.kind = kind == 3 ? softce::divergence::reverse_kl : kind == 4 ? softce::divergence::jsd : softce::divergence::kl;
  cp::call_description call;
  std::function<double(const softce::class_shard&)> core;
  if (kind == 0) {
    call = cp::describe("f", lo, C, x, y, o);
    core = [&](const softce::class_shard& s) { return cp::cross_entropy(s, x, y, o, out); };
  } else if (kind == 1) {
    call = cp::describe("f", lo, C, x, tk, o);
    core = [&](const softce::class_shard& s) { return cp::cross_entropy(s, x, tk, o, out); };
  } else {
    call = cp::describe("f", lo, C, x, zs, d);
    core = [&](const softce::class_shard& s) { return cp::distillation_loss(s, x, zs, d, out); };
  }
  return cp::run(t, call, core);
}

// The commutative reduce mode (MAX of the shifts, SUM of the rescaled records) against the
// ordered merge, for every record kind: index targets (ce records), top-k with a tail (two
// shifts), distillation kl / reverse_kl (two shifts) and jsd (a second round of plain sums).
TEST(ReduceMode, CommutativeMatchesOrdered) {
  problem p;
  std::vector<float> z(p.x.size()), topv(N * 2, 0.3f);
  for (std::size_t i = 0; i < z.size(); ++i) z[i] = static_cast<float>(std::cos(0.3 * static_cast<double>(i)) * 3.0);
  std::vector<std::int64_t> top(N * 2);
  for (std::int64_t r = 0; r < N; ++r) top[2 * r] = r, top[2 * r + 1] = C - 1 - r;
  const int P = 3;
  for (int kind = 0; kind < 5; ++kind) {
    double loss[2][P] = {};
    std::vector<float> grad[2][P];
    for (int m = 0; m < 2; ++m) {
      const cp::reduce_mode mode = m ? cp::reduce_mode::commutative : cp::reduce_mode::ordered;
      fake_group group(P);
      const auto messages = group.run(
          [&](int r, const cp::transport& t) {
            const array_view x = p.shard(r, P);
            const std::int64_t lo = problem::lo(r, P), width = problem::lo(r + 1, P) - lo;
            const array_view zs = softce::view(z.data() + lo, {N, width}, {C, 1});
            grad[m][r].assign(static_cast<std::size_t>(N * width), -7.0f);
            softce::outputs out;
            out.grad = softce::view(grad[m][r].data(), {N, width});
            const softce::topk tk{softce::view(top.data(), {N, 2}), softce::view(topv.data(), {N, 2}), true};
            softce::cross_entropy_options o;
            o.label_smoothing = 0.1;
            softce::distillation_options d;
            d.temperature = 2.0;
            // top-k (kind 1) without label smoothing
            loss[m][r] = run_kind(kind, t, lo, x, softce::view(p.y.data(), {N}), tk, zs,
                                  kind == 1 ? softce::cross_entropy_options{} : o, d, out);
          },
          [&](int) { return mode; });
      expect_everywhere(messages, "");
    }
    for (int r = 0; r < P; ++r) {
      EXPECT_NEAR(loss[1][r], loss[0][r], 1e-6 * std::abs(loss[0][r])) << "kind " << kind;
      EXPECT_EQ(std::memcmp(&loss[1][r], &loss[1][0], sizeof(double)), 0) << "kind " << kind << ": ranks differ";
      for (std::size_t i = 0; i < grad[0][r].size(); ++i)
        EXPECT_NEAR(grad[1][r][i], grad[0][r][i], 1e-6) << "kind " << kind << " rank " << r << " element " << i;
    }
  }
}

// The commutative mode must keep the NaN contract: a NaN or +inf logit on one rank, or a NaN
// teacher logit, poisons its row's loss and whole gradient row on every rank. The fake
// transport's MAX is std::fmax, which drops NaN (as an MPI or gloo MAX may): the poison has
// to travel in the sums.
TEST(ReduceMode, CommutativeKeepsPoisonedRowsNaN) {
  problem p;
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  p.x[1 * C + 4] = static_cast<float>(nan);  // row 1: a NaN on rank 1 (classes [3, 6))
  p.x[2 * C + 8] = static_cast<float>(inf);  // row 2: +inf on rank 2 (classes [6, 10))
  std::vector<float> z(p.x.size());
  for (std::size_t i = 0; i < z.size(); ++i) z[i] = static_cast<float>(std::cos(0.3 * static_cast<double>(i)));
  z[3 * C + 1] = static_cast<float>(nan);  // row 3: a NaN teacher logit on rank 0 (distillation)
  std::vector<float> topv(N * 2, 0.3f);
  std::vector<std::int64_t> top(N * 2);
  for (std::int64_t r = 0; r < N; ++r) top[2 * r] = r, top[2 * r + 1] = C - 1 - r;
  const int P = 3;
  for (int kind = 0; kind < 5; ++kind) {
    for (int m = 0; m < 2; ++m) {
      const cp::reduce_mode mode = m ? cp::reduce_mode::commutative : cp::reduce_mode::ordered;
      double losses[P][N];
      std::vector<float> grad[P];
      fake_group group(P);
      const auto messages = group.run(
          [&](int r, const cp::transport& t) {
            const array_view x = p.shard(r, P);
            const std::int64_t lo = problem::lo(r, P), width = problem::lo(r + 1, P) - lo;
            const array_view zs = softce::view(z.data() + lo, {N, width}, {C, 1});
            grad[r].assign(static_cast<std::size_t>(N * width), -7.0f);
            softce::outputs out;
            out.grad = softce::view(grad[r].data(), {N, width});
            out.losses = softce::view(losses[r], {N});
            const softce::topk tk{softce::view(top.data(), {N, 2}), softce::view(topv.data(), {N, 2}), true};
            softce::cross_entropy_options o;
            o.reduce = softce::reduction::none;
            softce::distillation_options d;
            d.reduce = softce::reduction::none;
            run_kind(kind, t, lo, x, softce::view(p.y.data(), {N}), tk, zs, o, d, out);
          },
          [&](int) { return mode; });
      expect_everywhere(messages, "");
      for (int r = 0; r < P; ++r) {
        const std::int64_t width = problem::lo(r + 1, P) - problem::lo(r, P);
        for (std::int64_t row = 0; row < N; ++row) {
          const bool poisoned = row == 1 || row == 2 || (kind >= 2 && row == 3);
          EXPECT_EQ(std::isnan(losses[r][row]), poisoned)
              << "kind " << kind << " mode " << m << " rank " << r << " row " << row << ": " << losses[r][row];
          for (std::int64_t c = 0; c < width; ++c) {
            const float g = grad[r][static_cast<std::size_t>(row * width + c)];
            EXPECT_EQ(std::isnan(g), poisoned) << "kind " << kind << " mode " << m << " rank " << r << " row " << row
                                               << " class " << c << ": " << g;
          }
        }
      }
    }
  }
}

TEST(ReduceMode, DiffersAcrossRanks) {
  problem p;
  fake_group group(2);
  const auto messages = group.run(
      [&](int r, const cp::transport& t) {
        const array_view x = p.shard(r, 2), y = softce::view(p.y.data(), {N});
        const auto call = cp::describe("f", problem::lo(r, 2), C, x, y, ce{});
        cp::run(t, call, [&](const softce::class_shard& s) { return cp::cross_entropy(s, x, y); });
      },
      [](int r) { return r == 1 ? cp::reduce_mode::commutative : cp::reduce_mode::ordered; });
  expect_everywhere(messages, "f: reduce mode differs across ranks (rank 0: 'ordered', rank 1: 'commutative')");
}

TEST(ReduceMode, UnknownRecordsAreAnError) {
  auto merge = [](double* inout, const double* in, std::int64_t count) {
    for (std::int64_t i = 0; i < count; ++i) inout[i] *= in[i];
  };
  double records[3] = {1, 2, 3};
  auto none = [](double*, std::int64_t) {};
  try {
    cp::commutative_all_reduce(records, 1, 3, merge, none, none);
    ADD_FAILURE() << "no error";
  } catch (const softce::error& e) {
    EXPECT_STREQ(e.what(), "commutative_all_reduce: merge: expected one of softce's record merge functions "
                           "(width 3); use the ordered all-reduce for records of your own");
  }
}

}  // namespace
