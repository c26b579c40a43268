// Thread count: results (loss, gradient, per-row losses) are bitwise identical for 1 and 2
// threads, on inputs big enough to be split across threads.
#include "test_support.hpp"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <thread>

namespace softce_test {
namespace {

using softce::divergence;
using softce::reduction;

// Restores the thread count on exit.
struct thread_count_guard {
  int saved = softce::get_num_threads();
  ~thread_count_guard() { softce::set_num_threads(saved); }
};

struct bits {
  double loss;
  std::vector<unsigned char> grad, losses;
};

bits run_with_threads(int threads, const std::function<double(const softce::outputs&)>& call, const shape_t& grad_shape,
                      dtype grad_type, const shape_t& losses_shape) {
  softce::set_num_threads(threads);
  EXPECT_EQ(softce::get_num_threads(), threads);
  tensor g(grad_shape, grad_type), l(losses_shape, dtype::float64);
  softce::outputs out;
  out.grad = g.mutable_view();
  if (!losses_shape.empty()) out.losses = l.mutable_view();
  const double loss = call(out);
  return {loss, g.element_bytes(), losses_shape.empty() ? std::vector<unsigned char>{} : l.element_bytes()};
}

void expect_same_bits(const std::string& what, const std::function<double(const softce::outputs&)>& call,
                      const shape_t& grad_shape, dtype grad_type, const shape_t& losses_shape = {}) {
  SCOPED_TRACE(what);
  thread_count_guard guard;
  const bits one = run_with_threads(1, call, grad_shape, grad_type, losses_shape);
  const bits two = run_with_threads(2, call, grad_shape, grad_type, losses_shape);
  const bits two_again = run_with_threads(2, call, grad_shape, grad_type, losses_shape);
  EXPECT_EQ(std::memcmp(&one.loss, &two.loss, sizeof(double)), 0) << std::setprecision(17) << one.loss << " vs " << two.loss;
  EXPECT_EQ(std::memcmp(&two.loss, &two_again.loss, sizeof(double)), 0);
  EXPECT_TRUE(one.grad == two.grad) << "gradients differ";
  EXPECT_TRUE(one.losses == two.losses) << "per-row losses differ";
}

TEST(Threads, SetAndGet) {
  thread_count_guard guard;
  EXPECT_GE(softce::get_num_threads(), 1);
  softce::set_num_threads(3);
  EXPECT_EQ(softce::get_num_threads(), 3);
  softce::set_num_threads(1);
  EXPECT_EQ(softce::get_num_threads(), 1);
}

// Many rows of a few thousand classes, and a few rows of more than 256k classes (run one at
// a time over the threads, kSplitRowMin in src/row_driver.hpp), with a masked row, ignored
// labels, class weights and label smoothing.
TEST(Threads, RowLossesAreBitwiseIdenticalForOneAndTwoThreads) {
  std::mt19937_64 rng(901);
  for (const auto& [shape, type] : {std::pair{shape_t{512, 4096}, dtype::float32},
                                    std::pair{shape_t{512, 4096}, dtype::float64},
                                    std::pair{shape_t{3, 4 * 65536 + 1000}, dtype::float32}}) {
    const std::int64_t N = shape[0], C = shape[1];
    const tensor x = make_tensor(shape, type, normal_values(rng, N * C, 2.0));
    const tensor z = make_tensor(shape, type, normal_values(rng, N * C, 2.0));
    const tensor t = make_tensor(shape, type, probability_targets(rng, shape));
    std::vector<std::int64_t> y(N), m(N);
    for (auto& v : y) v = rng() % 10 == 0 ? -100 : static_cast<std::int64_t>(rng() % C);
    for (auto& v : m) v = rng() % 5 != 0;
    m[1] = 0;  // at least one masked row
    const tensor labels = make_index_tensor({N}, dtype::int32, y);
    const tensor mask = make_index_tensor({N}, dtype::boolean, m);
    const tensor w = make_tensor({C}, type, uniform_values(rng, C, 0.5, 1.5));
    const topk_data d = random_topk(rng, shape, 16, false);
    const tensor idx = make_index_tensor(d.shape, dtype::int64, d.indices), val = make_tensor(d.shape, type, d.values);
    std::string name = name_of(type);
    name += ' ';
    name += shape_text(shape);

    for (reduction r : {reduction::mean, reduction::none}) {
      const std::string suffix = std::string(" ") + reduction_text(r) + " " + name;
      const shape_t losses_shape = r == reduction::none ? shape_t{N} : shape_t{};
      softce::cross_entropy_options o;
      o.reduce = r;
      o.weight = w.view();
      o.label_smoothing = 0.1;
      expect_same_bits("index targets" + suffix,
                       [&](const softce::outputs& out) { return softce::cross_entropy(x.view(), labels.view(), o, out); }, shape, type,
                       losses_shape);
      softce::cross_entropy_options pm;
      pm.reduce = r;
      pm.mask = mask.view();
      expect_same_bits("probability targets" + suffix,
                       [&](const softce::outputs& out) { return softce::cross_entropy(x.view(), t.view(), pm, out); }, shape, type,
                       losses_shape);
      expect_same_bits("top-k tail" + suffix,
                       [&](const softce::outputs& out) {
                         return softce::cross_entropy(x.view(), softce::topk{idx.view(), val.view(), true}, pm, out);
                       },
                       shape, type, losses_shape);
      for (divergence kind : {divergence::kl, divergence::reverse_kl, divergence::jsd}) {
        softce::distillation_options dop;
        dop.kind = kind;
        dop.temperature = 2;
        dop.reduce = r == reduction::mean ? reduction::batchmean : r;
        dop.mask = mask.view();
        expect_same_bits(std::string("distillation ") + divergence_text(kind) + suffix,
                         [&](const softce::outputs& out) { return softce::distillation_loss(x.view(), z.view(), dop, out); }, shape,
                         type, losses_shape);
      }
      softce::distillation_options dk;
      dk.reduce = r == reduction::mean ? reduction::batchmean : r;
      expect_same_bits("distillation top-k" + suffix,
                       [&](const softce::outputs& out) {
                         return softce::distillation_loss(x.view(), softce::topk{idx.view(), val.view(), true}, dk, out);
                       },
                       shape, type, losses_shape);
    }
  }
}

TEST(Threads, ElementwiseLossesAreBitwiseIdenticalForOneAndTwoThreads) {
  std::mt19937_64 rng(902);
  for (const shape_t& shape : {shape_t{512, 4096}, shape_t{4, 300000}, shape_t{2000000}}) {
    const std::int64_t n = product(shape);
    const tensor x = make_tensor(shape, dtype::float32, uniform_values(rng, n, -5.0, 0.0));
    const tensor t = make_tensor(shape, dtype::float32, uniform_values(rng, n, 0.0, 1.0));
    const tensor pw = make_tensor({shape.back()}, dtype::float32, uniform_values(rng, shape.back(), 0.5, 2.0));
    for (reduction r : {reduction::mean, reduction::sum}) {
      softce::kl_div_options kl;
      kl.reduce = r;
      expect_same_bits("kl_div " + shape_text(shape),
                       [&](const softce::outputs& out) { return softce::kl_div(x.view(), t.view(), kl, out); }, shape, dtype::float32);
      softce::bce_options bce;
      bce.reduce = r;
      bce.pos_weight = pw.view();
      expect_same_bits("bce " + shape_text(shape),
                       [&](const softce::outputs& out) { return softce::binary_cross_entropy_with_logits(x.view(), t.view(), bce, out); },
                       shape, dtype::float32);
    }
  }
}

// In place: the gradient written over a copy of the logits, which is also the input.
bits run_in_place_with_threads(int threads, const tensor& x,
                               const std::function<double(const softce::array_view&, const softce::outputs&)>& call) {
  softce::set_num_threads(threads);
  tensor g = make_tensor(x.shape(), x.type(), x.values());
  softce::outputs out;
  out.grad = g.mutable_view();
  const double loss = call(g.view(), out);
  return {loss, g.element_bytes(), {}};
}

void expect_same_bits_in_place(const std::string& what, const tensor& x,
                               const std::function<double(const softce::array_view&, const softce::outputs&)>& call) {
  SCOPED_TRACE(what + " in place");
  thread_count_guard guard;
  const bits one = run_in_place_with_threads(1, x, call);
  const bits two = run_in_place_with_threads(2, x, call);
  EXPECT_EQ(std::memcmp(&one.loss, &two.loss, sizeof(double)), 0) << std::setprecision(17) << one.loss << " vs " << two.loss;
  EXPECT_TRUE(one.grad == two.grad) << "gradients differ";
}

// Few rows of many classes: a row is split into pieces across threads (kRowPiece = 64k
// classes) and the pieces' statistics merged in a fixed order. C is not a multiple of
// the piece or of the chunk; the top-k entries straddle piece boundaries; a -inf logit
// sits in one piece and the row's max in another. Rows of more than 256k classes
// (kSplitRowMin) run one at a time with their pieces over the threads, however many rows.
TEST(Threads, LongRowsSplitAcrossThreadsAreBitwiseIdentical) {
  std::mt19937_64 rng(904);
  for (const shape_t& shape :
       {shape_t{1, 3 * 65536 + 1000}, shape_t{3, 2 * 65536 + 17}, shape_t{2, 4 * 65536 + 1000}}) {
    const std::int64_t N = shape[0], C = shape[1], n = N * C;
    for (dtype type : {dtype::float32, dtype::float64, dtype::bfloat16, dtype::float16}) {
      std::vector<double> xv = normal_values(rng, n, 3.0), zv = normal_values(rng, n, 3.0);
      xv[static_cast<std::size_t>(C - 5)] = 40.0;  // the max in the last piece
      xv[17] = -inf;
      const tensor x = make_tensor(shape, type, xv), z = make_tensor(shape, type, zv);
      const tensor t = make_tensor(shape, type, probability_targets(rng, shape));
      std::vector<std::int64_t> y(static_cast<std::size_t>(N));
      for (auto& v : y) v = static_cast<std::int64_t>(rng() % C);
      const tensor labels = make_index_tensor({N}, dtype::int64, y);
      topk_data d = random_topk(rng, shape, 8, false);
      d.indices[0] = 65535;  // the last class of the first piece, then the first of the second
      d.indices[1] = 65536;
      const tensor idx = make_index_tensor(d.shape, dtype::int64, d.indices), val = make_tensor(d.shape, type, d.values);
      const std::string suffix = " " + shape_text(shape) + " " + name_of(type);
      const shape_t losses_shape{N};
      softce::cross_entropy_options o;
      o.reduce = reduction::none;
      softce::cross_entropy_options smooth;
      smooth.label_smoothing = 0.1;

      auto ce_index = [&](const softce::array_view& in, const softce::outputs& out) {
        return softce::cross_entropy(in, labels.view(), smooth, out);
      };
      auto ce_dense = [&](const softce::array_view& in, const softce::outputs& out) {
        return softce::cross_entropy(in, t.view(), o, out);
      };
      auto ce_topk = [&](bool tail) {
        return [&, tail](const softce::array_view& in, const softce::outputs& out) {
          return softce::cross_entropy(in, softce::topk{idx.view(), val.view(), tail}, o, out);
        };
      };
      expect_same_bits("index targets" + suffix, [&](const softce::outputs& out) { return ce_index(x.view(), out); },
                       shape, type);
      expect_same_bits("probability targets" + suffix, [&](const softce::outputs& out) { return ce_dense(x.view(), out); },
                       shape, type, losses_shape);
      for (bool tail : {false, true}) {
        const std::string name = std::string(tail ? "top-k tail" : "top-k") + suffix;
        expect_same_bits(name, [&](const softce::outputs& out) { return ce_topk(tail)(x.view(), out); }, shape, type,
                         losses_shape);
        expect_same_bits_in_place(name, x, ce_topk(tail));
      }
      expect_same_bits_in_place("index targets" + suffix, x, ce_index);
      expect_same_bits_in_place("probability targets" + suffix, x, ce_dense);
      for (divergence kind : {divergence::kl, divergence::reverse_kl, divergence::jsd}) {
        softce::distillation_options dop;
        dop.kind = kind;
        dop.temperature = 2;
        dop.reduce = reduction::none;
        auto distill = [&](const softce::array_view& in, const softce::outputs& out) {
          return softce::distillation_loss(in, z.view(), dop, out);
        };
        const std::string name = std::string("distillation ") + divergence_text(kind) + suffix;
        expect_same_bits(name, [&](const softce::outputs& out) { return distill(x.view(), out); }, shape, type,
                         losses_shape);
        expect_same_bits_in_place(name, x, distill);
      }
      softce::distillation_options dk;
      dk.temperature = 0.5;
      expect_same_bits("distillation top-k" + suffix,
                       [&](const softce::outputs& out) {
                         return softce::distillation_loss(x.view(), softce::topk{idx.view(), val.view(), true}, dk, out);
                       },
                       shape, type);
    }
  }
}

// Strided and 16-bit inputs take the staging path; that must be deterministic too.
TEST(Threads, StagedRowsAreBitwiseIdenticalForOneAndTwoThreads) {
  std::mt19937_64 rng(903);
  const shape_t shape{64, 4096, 2};  // classes at stride 2
  const std::int64_t n = product(shape);
  const tensor x = make_tensor(shape, dtype::bfloat16, normal_values(rng, n, 2.0));
  const tensor t = make_tensor(shape, dtype::bfloat16, probability_targets(rng, shape));
  expect_same_bits("bfloat16 (N, C, d)",
                   [&](const softce::outputs& out) { return softce::cross_entropy(x.view(), t.view(), {}, out); }, shape,
                   dtype::bfloat16);
}

// The ranges run as an OpenMP parallel region (threading.cpp). GNU libgomp cannot run a
// region in a child forked after the parent ran one; softce then computes on the child's
// calling thread alone. The child must neither hang nor differ by a bit.
TEST(Threads, ForkedChildNeitherHangsNorDiffers) {
  thread_count_guard guard;
  std::mt19937_64 rng(906);
  const shape_t shape{2, 3 * 65536 + 5};
  const tensor x = make_tensor(shape, dtype::float32, normal_values(rng, shape[0] * shape[1], 3.0));
  const tensor t = make_tensor(shape, dtype::float32, probability_targets(rng, shape));
  auto call = [&](const softce::outputs& out) { return softce::cross_entropy(x.view(), t.view(), {}, out); };
  const bits parent = run_with_threads(2, call, shape, dtype::float32, {});  // a parallel region ran
  const pid_t child = fork();
  ASSERT_GE(child, 0) << "fork failed";
  if (child == 0) {
    bool same = true;
    for (int threads : {2, 1, 2}) {
      const bits mine = run_with_threads(threads, call, shape, dtype::float32, {});
      same = same && std::memcmp(&mine.loss, &parent.loss, sizeof(double)) == 0 && mine.grad == parent.grad;
    }
    _exit(same ? 0 : 3);
  }
  int status = 0;
  pid_t done = 0;
  for (int waited_ms = 0; waited_ms < 60000 && done == 0; waited_ms += 10) {
    done = waitpid(child, &status, WNOHANG);
    if (done == 0) usleep(10000);
  }
  if (done == 0) {
    kill(child, SIGKILL);
    waitpid(child, &status, 0);
    FAIL() << "the forked child did not finish within 60 s (a hang in the thread runtime)";
  }
  ASSERT_TRUE(WIFEXITED(status)) << "the forked child died (signal " << (WIFSIGNALED(status) ? WTERMSIG(status) : 0) << ")";
  EXPECT_EQ(WEXITSTATUS(status), 0) << "the forked child's result differs from the parent's";
}

// Calls from several user threads at once, each split across threads: every result equals
// the sequential one.
TEST(Threads, ConcurrentCallersGetTheSequentialBits) {
  thread_count_guard guard;
  softce::set_num_threads(2);
  std::mt19937_64 rng(907);
  const shape_t shape{64, 70000};
  const tensor x = make_tensor(shape, dtype::float32, normal_values(rng, shape[0] * shape[1], 3.0));
  const tensor t = make_tensor(shape, dtype::float32, probability_targets(rng, shape));
  auto call = [&](const softce::outputs& out) { return softce::cross_entropy(x.view(), t.view(), {}, out); };
  const bits expected = run_with_threads(2, call, shape, dtype::float32, {});
  constexpr int callers = 4, repeats = 3;
  std::vector<int> mismatches(callers, 0);
  std::vector<std::thread> threads;
  for (int c = 0; c < callers; ++c)
    threads.emplace_back([&, c] {
      for (int k = 0; k < repeats; ++k) {
        tensor g(shape, dtype::float32);
        softce::outputs out;
        out.grad = g.mutable_view();
        const double loss = call(out);
        if (std::memcmp(&loss, &expected.loss, sizeof(double)) != 0 || g.element_bytes() != expected.grad) ++mismatches[c];
      }
    });
  for (auto& th : threads) th.join();
  for (int c = 0; c < callers; ++c) EXPECT_EQ(mismatches[c], 0) << "caller " << c;
}

}  // namespace
}  // namespace softce_test
