// softce CLI — the classifier: a linear model or a ReLU MLP, float32, GEMMs through BLAS.
//
// logits = L_k(relu(... relu(L_1(standardize(x))))) with L(a) = a·Wᵀ + b, W (out, in).
// standardize(x) = (x − mean) · scale per input feature, fitted on the training features
// and stored with the model, so `predict` takes raw features.
// Initialisation follows torch.nn.Linear (U(±1/√fan_in) for weights and biases), drawn from
// a seeded generator whose sequence is fixed here (not the standard library's
// distributions), so a seed gives the same model with any compiler.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace softce::cli {

// splitmix64: small, fast, fully specified.
class random_generator {
 public:
  explicit random_generator(std::uint64_t seed) : state_(seed) {}
  std::uint64_t next() {
    std::uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }  // [0, 1)
  std::uint64_t below(std::uint64_t n) {                                      // [0, n)
    return static_cast<std::uint64_t>((static_cast<unsigned __int128>(next()) * n) >> 64);
  }

 private:
  std::uint64_t state_;
};

// Fisher–Yates with random_generator.
void shuffle(std::vector<std::int64_t>& order, random_generator& rng);

struct layer {
  std::int64_t in = 0, out = 0;
  std::vector<float> weight;  // (out, in)
  std::vector<float> bias;    // (out)
};

struct model {
  std::int64_t inputs = 0;
  std::int64_t classes = 0;
  std::vector<std::int64_t> hidden;  // empty: linear
  std::vector<float> mean, scale;    // (inputs) standardisation
  std::vector<layer> layers;

  std::string architecture() const;  // "linear" or "mlp:512,256"
  std::int64_t parameter_count() const;
};

// "linear" or "mlp:H[,H2...]"; input_error otherwise.
std::vector<std::int64_t> parse_architecture(const std::string& spec);

// Parameters (weights + biases) of that architecture.
std::int64_t parameter_count(std::int64_t inputs, const std::vector<std::int64_t>& hidden,
                             std::int64_t classes);
// input_error naming --model when the model would have more than max_parameters, or one
// batch of `batch` rows more than max_table_values activations in a layer (limits.hpp).
void check_model_size(std::int64_t inputs, const std::vector<std::int64_t>& hidden,
                      std::int64_t classes, std::int64_t batch);

model make_model(std::int64_t inputs, const std::vector<std::int64_t>& hidden,
                 std::int64_t classes, std::uint64_t seed);

// Per-feature mean and 1/std over the rows (features with std < 1e-6 get scale 1).
void fit_standardization(model& m, const float* x, std::int64_t rows);

// Activations of one batch, kept for the backward pass. Buffers grow to the largest batch.
struct workspace {
  std::int64_t batch = 0;
  std::vector<std::vector<float>> activation;  // [0]: standardised input (B, inputs);
                                               // [l]: output of layer l (B, out_l);
                                               // back(): logits (B, classes)
  std::vector<float> grad_a, grad_b;           // scratch for the backward pass
  const float* logits() const { return activation.back().data(); }
};

struct gradients {
  std::vector<std::vector<float>> weight, bias;  // per layer, shapes as the model's
};

// x (batch, inputs) -> ws.logits() (batch, classes)
void forward(const model& m, const float* x, std::int64_t batch, workspace& ws);
// grad_logits (batch, classes) -> parameter gradients (of the same loss)
void backward(const model& m, workspace& ws, const float* grad_logits, gradients& g);

// Adam as torch.optim.Adam (no weight decay): bias-corrected moments, eps added to √v̂.
class adam {
 public:
  explicit adam(const model& m);
  void step(model& m, const gradients& g, double lr);

 private:
  double beta1_ = 0.9, beta2_ = 0.999, eps_ = 1e-8;
  std::int64_t t_ = 0;
  std::vector<std::vector<float>> m_weight_, v_weight_, m_bias_, v_bias_;
};

// logits (rows, classes) for x (rows, inputs), computed in batches.
std::vector<float> predict_logits(const model& m, const float* x, std::int64_t rows);

// The model file (model.json): see docs/cli.md. `training` is stored as given (JSON text).
std::string model_to_json(const model& m, const std::string& training_json);
model model_from_json(const std::string& text, const std::string& path);
model load_model(const std::string& path);

}  // namespace softce::cli
