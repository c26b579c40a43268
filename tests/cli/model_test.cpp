// Unit tests of the CLI's model (tools/model.hpp), training loop (tools/training.hpp) and
// staged outputs (tools/outputs.hpp).
#include "model.hpp"

#include <gtest/gtest.h>
#include <softce/softce.hpp>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "cli_error.hpp"
#include "outputs.hpp"
#include "table.hpp"
#include "training.hpp"

using namespace softce::cli;
namespace fs = std::filesystem;

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

// Mean cross-entropy of the model on (x, y).
double loss_of(const model& m, const std::vector<float>& x, const std::vector<std::int64_t>& y) {
  workspace ws;
  const std::int64_t B = static_cast<std::int64_t>(y.size());
  forward(m, x.data(), B, ws);
  return softce::cross_entropy(softce::view(ws.logits(), {B, m.classes}),
                               softce::view(y.data(), {B}));
}

// Two Gaussian blobs per class, n rows, D features.
void blobs(std::int64_t n, std::int64_t D, std::int64_t C, std::vector<float>& x,
           std::vector<std::int64_t>& y, std::uint64_t seed) {
  random_generator rng(seed);
  x.resize(n * D);
  y.resize(n);
  for (std::int64_t r = 0; r < n; ++r) {
    y[r] = static_cast<std::int64_t>(rng.below(C));
    for (std::int64_t d = 0; d < D; ++d)
      x[r * D + d] = static_cast<float>((d % C == y[r] ? 3.0 : 0.0) + rng.uniform() - 0.5);
  }
}

fs::path temp_dir(const std::string& name) {
  fs::path p = fs::temp_directory_path() / ("softce-cli-test-" + std::to_string(::getpid()) + "-" + name);
  fs::remove_all(p);
  return p;
}

}  // namespace

TEST(architecture, parse) {
  EXPECT_EQ(parse_architecture("linear"), std::vector<std::int64_t>{});
  EXPECT_EQ(parse_architecture("mlp:512,256"), (std::vector<std::int64_t>{512, 256}));
  for (const char* bad : {"mlp", "mlp:", "mlp:0", "mlp:12,", "mlp:a", "cnn:3", "mlp:99999999"})
    EXPECT_EQ(error_of([&] { parse_architecture(bad); }),
              std::string("invalid --model '") + bad +
                  "' (expected linear or mlp:H[,H2...] with hidden sizes 1..65536)");
}

TEST(model, backward_matches_finite_differences) {
  std::vector<float> x;
  std::vector<std::int64_t> y;
  blobs(8, 5, 3, x, y, 1);
  model m = make_model(5, {6, 4}, 3, 7);
  workspace ws;
  forward(m, x.data(), 8, ws);
  std::vector<float> grad(8 * 3);
  softce::outputs out;
  out.grad = softce::view(grad.data(), {8, 3});
  softce::cross_entropy(softce::view(ws.logits(), {8, 3}), softce::view(y.data(), {8}), {}, out);
  gradients g;
  backward(m, ws, grad.data(), g);
  for (std::size_t l = 0; l < m.layers.size(); ++l) {
    for (std::size_t i = 0; i < m.layers[l].weight.size(); i += 3) {
      model plus = m, minus = m;
      const float h = 1e-2f;
      plus.layers[l].weight[i] += h;
      minus.layers[l].weight[i] -= h;
      const double numeric = (loss_of(plus, x, y) - loss_of(minus, x, y)) / (2 * h);
      EXPECT_NEAR(g.weight[l][i], numeric, 2e-3 + 2e-2 * std::fabs(numeric))
          << "layer " << l << " weight " << i;
    }
    for (std::size_t i = 0; i < m.layers[l].bias.size(); ++i) {
      model plus = m, minus = m;
      const float h = 1e-2f;
      plus.layers[l].bias[i] += h;
      minus.layers[l].bias[i] -= h;
      const double numeric = (loss_of(plus, x, y) - loss_of(minus, x, y)) / (2 * h);
      EXPECT_NEAR(g.bias[l][i], numeric, 2e-3 + 2e-2 * std::fabs(numeric));
    }
  }
}

TEST(training, learns_and_is_deterministic) {
  std::vector<float> x;
  std::vector<std::int64_t> y;
  blobs(600, 6, 3, x, y, 2);
  table yt;
  yt.path = "y";
  yt.rows = 600;
  yt.cols = 1;
  for (auto v : y) yt.values.push_back(static_cast<float>(v));
  targets t = interpret_targets(yt, {});
  train_config c;
  c.epochs = 5;
  c.batch_size = 32;
  c.lr = 1e-2;
  c.seed = 3;
  const auto fit = [&](std::uint64_t seed) {
    model m = make_model(6, {8}, 3, seed);
    fit_standardization(m, x.data(), 600);
    auto history = train(m, x.data(), 600, t, c);
    EXPECT_EQ(history.size(), 5u);
    EXPECT_LT(history.back().train_loss, history.front().train_loss);
    return m;
  };
  model a = fit(1), b = fit(1), other = fit(2);
  EXPECT_EQ(a.layers[0].weight, b.layers[0].weight);
  EXPECT_EQ(a.layers[1].bias, b.layers[1].bias);
  EXPECT_NE(a.layers[0].weight, other.layers[0].weight);
  auto logits = predict_logits(a, x.data(), 600);
  evaluation e = evaluate(logits.data(), 600, 3, t);
  EXPECT_GT(e.accuracy, 0.97);
  EXPECT_EQ(e.nll, e.cross_entropy);
  EXPECT_GE(e.ece, 0.0);
  std::int64_t counted = 0;
  for (const auto& bin : e.bins) counted += bin.count;
  EXPECT_EQ(counted, 600);
}

TEST(training, one_hot_targets_train_exactly_like_indices) {
  std::vector<float> x;
  std::vector<std::int64_t> y;
  blobs(300, 4, 3, x, y, 5);
  table yt;
  yt.path = "y";
  yt.rows = 300;
  yt.cols = 1;
  for (auto v : y) yt.values.push_back(static_cast<float>(v));
  targets index = interpret_targets(yt, {});
  table pt;
  pt.path = "p";
  pt.rows = 300;
  pt.cols = 3;
  pt.values.assign(900, 0.0f);
  for (std::int64_t r = 0; r < 300; ++r) pt.values[r * 3 + y[r]] = 1.0f;
  targets probs = interpret_targets(pt, {});
  train_config c;
  c.epochs = 3;
  c.batch_size = 16;
  model a = make_model(4, {5}, 3, 9), b = a;
  auto ha = train(a, x.data(), 300, index, c);
  auto hb = train(b, x.data(), 300, probs, c);
  for (std::size_t e = 0; e < ha.size(); ++e) EXPECT_EQ(ha[e].train_loss, hb[e].train_loss);
  for (std::size_t l = 0; l < a.layers.size(); ++l) {
    EXPECT_EQ(a.layers[l].weight, b.layers[l].weight);
    EXPECT_EQ(a.layers[l].bias, b.layers[l].bias);
  }
}

TEST(training, kl_objective_is_cross_entropy_minus_entropy) {
  table pt;
  pt.path = "p";
  pt.rows = 2;
  pt.cols = 2;
  pt.values = {0.5f, 0.5f, 1.0f, 0.0f};
  targets t = interpret_targets(pt, {});
  auto h = target_entropy(t, 0.0, false);
  EXPECT_NEAR(h[0], std::log(2.0), 1e-12);
  EXPECT_EQ(h[1], 0.0);
  auto hs = target_entropy(t, 0.2, false);  // t' = 0.8 t + 0.1
  EXPECT_NEAR(hs[1], -(0.9 * std::log(0.9) + 0.1 * std::log(0.1)), 1e-7);
}

TEST(model_file, round_trip_and_corruption) {
  model m = make_model(3, {4}, 2, 11);
  m.mean = {1, 2, 3};
  m.scale = {0.5f, 1, 2};
  const std::string text = model_to_json(m, R"({"seed": 11})");
  model back = model_from_json(text, "m.json");
  EXPECT_EQ(back.architecture(), "mlp:4");
  EXPECT_EQ(back.mean, m.mean);
  EXPECT_EQ(back.scale, m.scale);
  for (std::size_t l = 0; l < m.layers.size(); ++l) {
    EXPECT_EQ(back.layers[l].weight, m.layers[l].weight);
    EXPECT_EQ(back.layers[l].bias, m.layers[l].bias);
  }
  EXPECT_EQ(error_of([] { model_from_json("{", "m.json"); }),
            "m.json: not a softce model file (invalid JSON at byte 2)");
  EXPECT_EQ(error_of([] { model_from_json("{}", "m.json"); }),
            "m.json: not a valid softce model file (no \"format\": \"softce-model\")");
  std::string wrong = text;
  wrong.replace(wrong.find("\"inputs\": 3"), 11, "\"inputs\": 4");
  EXPECT_EQ(error_of([&] { model_from_json(wrong, "m.json"); }),
            "m.json: not a valid softce model file (standardize.mean: shape does not match the "
            "architecture)");
}

TEST(outputs, commit_and_discard) {
  const fs::path dir = temp_dir("outputs");
  {
    staged_outputs out(dir.string() + "/a/b", true);
    out.write("x.txt", "hello");
    EXPECT_FALSE(fs::exists(dir / "a/b/x.txt"));
  }  // not committed: temp file and created directories removed
  EXPECT_FALSE(fs::exists(dir));
  {
    staged_outputs out(dir.string(), true);
    out.write("x.txt", "first");
    out.commit();
  }
  {
    staged_outputs out(dir.string(), true);
    out.write("x.txt", "second");
  }  // failed run: earlier output intact, no temporary left
  std::ifstream in(dir / "x.txt");
  std::string content((std::istreambuf_iterator<char>(in)), {});
  EXPECT_EQ(content, "first");
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), fs::directory_iterator()), 1);
  EXPECT_EQ(error_of([&] { staged_outputs out((dir / "x.txt").string(), true); }),
            (dir / "x.txt").string() + ": exists and is not a directory");
  EXPECT_EQ(error_of([&] { staged_outputs out((dir / "x.txt/sub").string(), true); }),
            (dir / "x.txt/sub").string() + ": cannot create the output directory: Not a directory");
  EXPECT_EQ(error_of([&] { staged_outputs out((dir / "missing").string(), false); }),
            (dir / "missing").string() + ": cannot write there: No such file or directory");
  fs::remove_all(dir);
}

TEST(outputs, array_writers_round_trip) {
  const std::vector<float> v{0.1f, 1e-30f, -3.4028235e38f, 0.3333333f, 7, 0};
  table n = parse_npy(npy_bytes(v.data(), 2, 3), "a.npy");
  EXPECT_EQ(n.rows, 2);
  EXPECT_EQ(n.cols, 3);
  EXPECT_EQ(n.values, v);
  table c = parse_csv(csv_bytes(v.data(), 3, 2), "a.csv");
  EXPECT_EQ(c.values, v);  // shortest round-trip decimals: exact
  const std::string bytes = npy_bytes(v.data(), 2, 3);
  EXPECT_EQ((bytes.find('\n') + 1) % 64, 0u);  // header padded to 64 bytes
}

TEST(training, divergence_is_an_error_not_a_nan_model) {
  std::vector<float> x;
  std::vector<std::int64_t> y;
  blobs(64, 4, 3, x, y, 2);
  table yt;
  yt.path = "y";
  yt.rows = 64;
  yt.cols = 1;
  for (auto v : y) yt.values.push_back(static_cast<float>(v));
  const targets index = interpret_targets(yt, {});
  train_config c;
  c.epochs = 50;
  c.batch_size = 16;
  c.lr = 1e30;  // beyond --lr's range: only reachable through the API
  c.cosine = false;
  model m = make_model(4, {32}, 3, 1);
  const std::string message = error_of([&] { train(m, x.data(), 64, index, c); });
  EXPECT_EQ(message.rfind("training diverged in epoch ", 0), 0u) << message;
  EXPECT_NE(message.find("lower --lr (now 1e+30)"), std::string::npos) << message;
}

TEST(model, size_limits) {
  EXPECT_EQ(parameter_count(784, {512, 256}, 10), 784 * 512 + 512 + 512 * 256 + 256 + 256 * 10 + 10);
  EXPECT_EQ(error_of([] { check_model_size(4, {65536, 65536}, 3, 128); }),
            "--model mlp:65536,65536: 4295557123 parameters for 4 inputs and 3 classes, more "
            "than the limit of 134217728");
  EXPECT_EQ(error_of([] { check_model_size(1 << 20, {}, 1 << 24, 1); }),
            "--model linear: 17592202821632 parameters for 1048576 inputs and 16777216 classes, "
            "more than the limit of 134217728");
  EXPECT_EQ(error_of([] { check_model_size(4, {65536}, 3, 1 << 14); }),
            "--model mlp:65536: a hidden layer of 65536 units over batches of 16384 rows exceeds "
            "the limit of 268435456 activations (lower --batch-size)");
  EXPECT_EQ(error_of([] { check_model_size(784, {512, 256}, 10, 128); }), "");
}

TEST(outputs, commit_is_all_or_nothing) {
  const fs::path dir = temp_dir("all-or-nothing");
  const auto read = [](const fs::path& p) {
    std::ifstream in(p);
    return std::string((std::istreambuf_iterator<char>(in)), {});
  };
  {
    staged_outputs out(dir.string(), true);
    out.write("a.txt", "a1");
    out.write("b.txt", "b1");
    out.commit();
  }
  for (const char* failing : {"a.txt", "b.txt"}) {
    ::setenv("SOFTCE_TEST_FAIL_RENAME", failing, 1);
    staged_outputs out(dir.string(), true);
    out.write("a.txt", "a2");
    out.write("b.txt", "b2");
    out.write("c.txt", "c2");  // new: removed again on rollback
    EXPECT_EQ(error_of([&] { out.commit(); }),
              (dir / failing).string() +
                  ": cannot write: Input/output error (no output written, earlier outputs "
                  "unchanged)");
  }
  ::unsetenv("SOFTCE_TEST_FAIL_RENAME");
  EXPECT_EQ(read(dir / "a.txt"), "a1");
  EXPECT_EQ(read(dir / "b.txt"), "b1");
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), fs::directory_iterator()), 2);
  {
    staged_outputs out(dir.string(), true);
    out.write("a.txt", "a3");
    out.write("b.txt", "b3");
    out.commit();
  }
  EXPECT_EQ(read(dir / "a.txt"), "a3");
  EXPECT_EQ(read(dir / "b.txt"), "b3");
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), fs::directory_iterator()), 2);
  fs::remove_all(dir);
}

TEST(outputs, only_regular_files_are_replaced) {
  const fs::path dir = temp_dir("regular");
  fs::create_directories(dir);
  fs::create_symlink("/dev/null", dir / "link");
  staged_outputs out(dir.string(), false);
  EXPECT_EQ(error_of([&] { out.claim("link"); }),
            (dir / "link").string() +
                ": is a symbolic link; softce only replaces regular files (remove it or choose "
                "another --out)");
  EXPECT_EQ(error_of([] { require_replaceable("/dev/null"); }),
            "/dev/null: is a character device; softce only replaces regular files (remove it or "
            "choose another --out)");
  EXPECT_EQ(error_of([&] { out.claim("new.txt"); }), "");
  out.write("link", "x");
  EXPECT_EQ(error_of([&] { out.commit(); }),
            (dir / "link").string() +
                ": is a symbolic link; softce only replaces regular files (remove it or choose "
                "another --out)");
  EXPECT_TRUE(fs::is_symlink(dir / "link"));
  fs::remove_all(dir);
}
