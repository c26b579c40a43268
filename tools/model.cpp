// softce CLI — MLP forward/backward through the BLAS (sgemm), Adam, and the model file.
#include "model.hpp"

#include "blas.hpp"

#include <algorithm>
#include <bit>
#include <charconv>
#include <cmath>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>

#include "cli_error.hpp"
#include "limits.hpp"
#include "table.hpp"

namespace softce::cli {

void shuffle(std::vector<std::int64_t>& order, random_generator& rng) {
  for (std::size_t i = order.size(); i > 1; --i)
    std::swap(order[i - 1], order[rng.below(i)]);
}

std::string model::architecture() const {
  if (hidden.empty()) return "linear";
  std::string s = "mlp:";
  for (std::size_t i = 0; i < hidden.size(); ++i) {
    if (i) s += ',';
    s += std::to_string(hidden[i]);
  }
  return s;
}

std::int64_t model::parameter_count() const {
  std::int64_t n = 0;
  for (const auto& l : layers) n += l.out * l.in + l.out;
  return n;
}

std::int64_t parameter_count(std::int64_t inputs, const std::vector<std::int64_t>& hidden,
                             std::int64_t classes) {
  // Saturating: inputs, classes and widths are each below 2^31 here, so one product fits.
  std::int64_t n = 0, in = inputs;
  for (std::size_t l = 0; l <= hidden.size(); ++l) {
    const std::int64_t out = l < hidden.size() ? hidden[l] : classes;
    std::int64_t layer = 0;
    if (__builtin_mul_overflow(in, out, &layer) || __builtin_add_overflow(layer, out, &layer) ||
        __builtin_add_overflow(n, layer, &n))
      return std::numeric_limits<std::int64_t>::max();
    in = out;
  }
  return n;
}

void check_model_size(std::int64_t inputs, const std::vector<std::int64_t>& hidden,
                      std::int64_t classes, std::int64_t batch) {
  model shape;
  shape.hidden = hidden;
  const std::string spec = shape.architecture();
  const std::int64_t n = parameter_count(inputs, hidden, classes);
  if (n > max_parameters)
    throw input_error("--model " + spec + ": " + std::to_string(n) + " parameters for " +
                      std::to_string(inputs) + " inputs and " + std::to_string(classes) +
                      " classes, more than the limit of " + std::to_string(max_parameters));
  for (std::int64_t width : hidden)
    if (width > max_table_values / std::max<std::int64_t>(batch, 1))
      throw input_error("--model " + spec + ": a hidden layer of " + std::to_string(width) +
                        " units over batches of " + std::to_string(batch) +
                        " rows exceeds the limit of " + std::to_string(max_table_values) +
                        " activations (lower --batch-size)");
}

std::vector<std::int64_t> parse_architecture(const std::string& spec) {
  if (spec == "linear") return {};
  const auto bad = [&]() -> std::vector<std::int64_t> {
    throw input_error("invalid --model '" + spec +
                      "' (expected linear or mlp:H[,H2...] with hidden sizes 1..65536)");
  };
  if (spec.rfind("mlp:", 0) != 0 || spec.size() == 4) return bad();
  std::vector<std::int64_t> hidden;
  std::string_view rest = std::string_view(spec).substr(4);
  while (true) {
    std::size_t comma = rest.find(',');
    std::string_view item = rest.substr(0, comma);
    std::int64_t h = 0;
    auto [ptr, ec] = std::from_chars(item.data(), item.data() + item.size(), h);
    if (item.empty() || ec != std::errc() || ptr != item.data() + item.size() || h < 1 ||
        h > 65536)
      return bad();
    hidden.push_back(h);
    if (comma == std::string_view::npos) break;
    rest.remove_prefix(comma + 1);
  }
  if (hidden.size() > 8) return bad();
  return hidden;
}

model make_model(std::int64_t inputs, const std::vector<std::int64_t>& hidden,
                 std::int64_t classes, std::uint64_t seed) {
  model m;
  m.inputs = inputs;
  m.classes = classes;
  m.hidden = hidden;
  m.mean.assign(inputs, 0.0f);
  m.scale.assign(inputs, 1.0f);
  random_generator rng(seed);
  std::int64_t in = inputs;
  for (std::size_t l = 0; l <= hidden.size(); ++l) {
    layer L;
    L.in = in;
    L.out = l < hidden.size() ? hidden[l] : classes;
    const double bound = 1.0 / std::sqrt(static_cast<double>(in));
    L.weight.resize(L.out * L.in);
    L.bias.resize(L.out);
    for (auto& w : L.weight) w = static_cast<float>((2 * rng.uniform() - 1) * bound);
    for (auto& b : L.bias) b = static_cast<float>((2 * rng.uniform() - 1) * bound);
    in = L.out;
    m.layers.push_back(std::move(L));
  }
  return m;
}

void fit_standardization(model& m, const float* x, std::int64_t rows) {
  const std::int64_t D = m.inputs;
  std::vector<double> sum(D, 0.0), sum_sq(D, 0.0);
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t d = 0; d < D; ++d) {
      const double v = x[r * D + d];
      sum[d] += v;
      sum_sq[d] += v * v;
    }
  for (std::int64_t d = 0; d < D; ++d) {
    const double mean = sum[d] / static_cast<double>(rows);
    const double var = std::max(0.0, sum_sq[d] / static_cast<double>(rows) - mean * mean);
    const double sd = std::sqrt(var);
    m.mean[d] = static_cast<float>(mean);
    m.scale[d] = sd < 1e-6 ? 1.0f : static_cast<float>(1.0 / sd);
  }
}

void forward(const model& m, const float* x, std::int64_t batch, workspace& ws) {
  const std::size_t L = m.layers.size();
  ws.batch = batch;
  ws.activation.resize(L + 1);
  // standardised input (B, D)
  auto& a0 = ws.activation[0];
  a0.resize(batch * m.inputs);
  for (std::int64_t r = 0; r < batch; ++r)
    for (std::int64_t d = 0; d < m.inputs; ++d)
      a0[r * m.inputs + d] = (x[r * m.inputs + d] - m.mean[d]) * m.scale[d];
  for (std::size_t l = 0; l < L; ++l) {
    const layer& Ly = m.layers[l];
    const auto& in = ws.activation[l];
    auto& out = ws.activation[l + 1];
    out.resize(batch * Ly.out);
    // out (B, out) = in (B, in) · Wᵀ (in, out)
    softce::detail::blas::sgemm("softce", false, true, static_cast<int>(batch),
                static_cast<int>(Ly.out), static_cast<int>(Ly.in), 1.0f, in.data(),
                static_cast<int>(Ly.in), Ly.weight.data(), static_cast<int>(Ly.in), 0.0f,
                out.data(), static_cast<int>(Ly.out));
    const bool relu = l + 1 < L;
    for (std::int64_t r = 0; r < batch; ++r) {
      float* row = &out[r * Ly.out];
      for (std::int64_t j = 0; j < Ly.out; ++j) {
        const float v = row[j] + Ly.bias[j];
        row[j] = relu ? std::max(v, 0.0f) : v;
      }
    }
  }
}

void backward(const model& m, workspace& ws, const float* grad_logits, gradients& g) {
  const std::size_t L = m.layers.size();
  const std::int64_t B = ws.batch;
  g.weight.resize(L);
  g.bias.resize(L);
  ws.grad_a.assign(grad_logits, grad_logits + B * m.classes);
  for (std::size_t l = L; l-- > 0;) {
    const layer& Ly = m.layers[l];
    const auto& in = ws.activation[l];  // (B, in)
    const float* G = ws.grad_a.data();  // (B, out), gradient w.r.t. this layer's output
    g.weight[l].resize(Ly.out * Ly.in);
    g.bias[l].assign(Ly.out, 0.0f);
    // dW (out, in) = Gᵀ (out, B) · in (B, in)
    softce::detail::blas::sgemm("softce", true, false, static_cast<int>(Ly.out),
                static_cast<int>(Ly.in), static_cast<int>(B), 1.0f, G, static_cast<int>(Ly.out),
                in.data(), static_cast<int>(Ly.in), 0.0f, g.weight[l].data(),
                static_cast<int>(Ly.in));
    for (std::int64_t r = 0; r < B; ++r)
      for (std::int64_t j = 0; j < Ly.out; ++j) g.bias[l][j] += G[r * Ly.out + j];
    if (l == 0) break;
    // dA (B, in) = G (B, out) · W (out, in), then through the ReLU that produced `in`
    ws.grad_b.resize(B * Ly.in);
    softce::detail::blas::sgemm("softce", false, false, static_cast<int>(B),
                static_cast<int>(Ly.in), static_cast<int>(Ly.out), 1.0f, G,
                static_cast<int>(Ly.out), Ly.weight.data(), static_cast<int>(Ly.in), 0.0f,
                ws.grad_b.data(), static_cast<int>(Ly.in));
    for (std::int64_t i = 0; i < B * Ly.in; ++i)
      if (!(in[i] > 0.0f)) ws.grad_b[i] = 0.0f;
    std::swap(ws.grad_a, ws.grad_b);
  }
}

adam::adam(const model& m) {
  for (const auto& l : m.layers) {
    m_weight_.emplace_back(l.weight.size(), 0.0f);
    v_weight_.emplace_back(l.weight.size(), 0.0f);
    m_bias_.emplace_back(l.bias.size(), 0.0f);
    v_bias_.emplace_back(l.bias.size(), 0.0f);
  }
}

namespace {
void adam_update(std::vector<float>& p, const std::vector<float>& g, std::vector<float>& m,
                 std::vector<float>& v, float beta1, float beta2, float step_size,
                 float bias_correction2_sqrt, float eps) {
  const std::size_t n = p.size();
  for (std::size_t i = 0; i < n; ++i) {
    m[i] = beta1 * m[i] + (1 - beta1) * g[i];
    v[i] = beta2 * v[i] + (1 - beta2) * g[i] * g[i];
    p[i] -= step_size * m[i] / (std::sqrt(v[i]) / bias_correction2_sqrt + eps);
  }
}
}  // namespace

void adam::step(model& m, const gradients& g, double lr) {
  ++t_;
  const double bc1 = 1 - std::pow(beta1_, static_cast<double>(t_));
  const double bc2 = 1 - std::pow(beta2_, static_cast<double>(t_));
  const float step_size = static_cast<float>(lr / bc1);
  const float bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  for (std::size_t l = 0; l < m.layers.size(); ++l) {
    adam_update(m.layers[l].weight, g.weight[l], m_weight_[l], v_weight_[l],
                static_cast<float>(beta1_), static_cast<float>(beta2_), step_size, bc2_sqrt,
                static_cast<float>(eps_));
    adam_update(m.layers[l].bias, g.bias[l], m_bias_[l], v_bias_[l], static_cast<float>(beta1_),
                static_cast<float>(beta2_), step_size, bc2_sqrt, static_cast<float>(eps_));
  }
}

std::vector<float> predict_logits(const model& m, const float* x, std::int64_t rows) {
  std::vector<float> logits(rows * m.classes);
  workspace ws;
  constexpr std::int64_t chunk = 1024;
  for (std::int64_t r = 0; r < rows; r += chunk) {
    const std::int64_t b = std::min(chunk, rows - r);
    forward(m, x + r * m.inputs, b, ws);
    std::copy(ws.logits(), ws.logits() + b * m.classes, logits.begin() + r * m.classes);
  }
  return logits;
}

// ---------------------------------------------------------------------------------------
// model.json

namespace {

constexpr char base64_alphabet[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

std::string base64_encode(const unsigned char* data, std::size_t n) {
  std::string out;
  out.reserve((n + 2) / 3 * 4);
  for (std::size_t i = 0; i < n; i += 3) {
    std::uint32_t v = std::uint32_t{data[i]} << 16;
    if (i + 1 < n) v |= std::uint32_t{data[i + 1]} << 8;
    if (i + 2 < n) v |= data[i + 2];
    out += base64_alphabet[(v >> 18) & 63];
    out += base64_alphabet[(v >> 12) & 63];
    out += i + 1 < n ? base64_alphabet[(v >> 6) & 63] : '=';
    out += i + 2 < n ? base64_alphabet[v & 63] : '=';
  }
  return out;
}

bool base64_decode(const std::string& text, std::vector<unsigned char>& out) {
  int table[256];
  std::fill(std::begin(table), std::end(table), -1);
  for (int i = 0; i < 64; ++i) table[static_cast<unsigned char>(base64_alphabet[i])] = i;
  if (text.size() % 4 != 0) return false;
  out.clear();
  out.reserve(text.size() / 4 * 3);
  for (std::size_t i = 0; i < text.size(); i += 4) {
    int v[4];
    int pad = 0;
    for (int j = 0; j < 4; ++j) {
      const unsigned char c = static_cast<unsigned char>(text[i + j]);
      if (c == '=' && i + 4 == text.size() && j >= 2) {
        v[j] = 0;
        ++pad;
      } else {
        if (pad || table[c] < 0) return false;
        v[j] = table[c];
      }
    }
    const std::uint32_t w = (v[0] << 18) | (v[1] << 12) | (v[2] << 6) | v[3];
    out.push_back(static_cast<unsigned char>(w >> 16));
    if (pad < 2) out.push_back(static_cast<unsigned char>(w >> 8));
    if (pad < 1) out.push_back(static_cast<unsigned char>(w));
  }
  return true;
}

nlohmann::json float_array(const std::vector<float>& v, std::vector<std::int64_t> shape) {
  static_assert(std::endian::native == std::endian::little, "model files are little-endian");
  return {{"dtype", "<f4"},
          {"shape", shape},
          {"base64", base64_encode(reinterpret_cast<const unsigned char*>(v.data()),
                                   v.size() * sizeof(float))}};
}

}  // namespace

std::string model_to_json(const model& m, const std::string& training_json) {
  nlohmann::json j;
  j["format"] = "softce-model";
  j["version"] = 1;
  j["architecture"] = m.architecture();
  j["inputs"] = m.inputs;
  j["classes"] = m.classes;
  j["hidden"] = m.hidden;
  j["activation"] = "relu";
  j["standardize"] = {{"mean", float_array(m.mean, {m.inputs})},
                      {"scale", float_array(m.scale, {m.inputs})}};
  j["layers"] = nlohmann::json::array();
  for (const auto& l : m.layers)
    j["layers"].push_back({{"weight", float_array(l.weight, {l.out, l.in})},
                           {"bias", float_array(l.bias, {l.out})}});
  j["training"] = nlohmann::json::parse(training_json.empty() ? "{}" : training_json);
  return j.dump(1) + "\n";
}

model model_from_json(const std::string& text, const std::string& path) {
  const auto bad = [&](const std::string& why) -> input_error {
    return input_error(path + ": not a valid softce model file (" + why + ")");
  };
  // A model file holds a few dozen JSON values (the arrays are base64 strings), so a file
  // of millions of values or deep nesting is refused while it is parsed, before the
  // document (~16+ bytes per value) is built.
  constexpr int max_depth = 16;
  constexpr std::size_t max_values = 100000;
  std::size_t values = 0;
  const nlohmann::json::parser_callback_t limit = [&](int depth, nlohmann::json::parse_event_t event,
                                                      nlohmann::json&) {
    if (depth > max_depth)
      throw bad("nested deeper than " + std::to_string(max_depth) + " levels");
    if (event == nlohmann::json::parse_event_t::value && ++values > max_values)
      throw bad("more than " + std::to_string(max_values) + " JSON values");
    return true;
  };
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text, limit);
  } catch (const nlohmann::json::parse_error& e) {
    throw input_error(path + ": not a softce model file (invalid JSON at byte " +
                      std::to_string(e.byte) + ")");
  }
  try {
    if (!j.is_object() || j.value("format", "") != "softce-model")
      throw bad("no \"format\": \"softce-model\"");
    if (!j.at("version").is_number_integer() || j.at("version").get<std::int64_t>() != 1)
      throw bad("unsupported version " + j.at("version").dump());
    const auto integer = [&](const nlohmann::json& v, const std::string& name) {
      if (!v.is_number_integer()) throw bad(name + " is not an integer");
      return v.get<std::int64_t>();
    };
    model m;
    m.inputs = integer(j.at("inputs"), "inputs");
    m.classes = integer(j.at("classes"), "classes");
    if (!j.at("hidden").is_array()) throw bad("hidden is not an array");
    for (const auto& h : j.at("hidden")) m.hidden.push_back(integer(h, "hidden"));
    if (m.inputs < 1 || m.inputs > max_table_values || m.classes < 2 || m.classes > max_classes)
      throw bad("inputs or classes out of range");
    if (m.hidden.size() > 8) throw bad("more than 8 hidden layers");
    for (auto h : m.hidden)
      if (h < 1 || h > 65536) throw bad("hidden size out of range");
    if (const std::int64_t n = parameter_count(m.inputs, m.hidden, m.classes); n > max_parameters)
      throw bad(std::to_string(n) + " parameters, more than the limit of " +
                std::to_string(max_parameters));
    if (j.value("activation", "relu") != "relu") throw bad("unknown activation");
    const auto array = [&](const nlohmann::json& a, std::vector<std::int64_t> shape,
                           const std::string& name) {
      if (a.at("dtype").get<std::string>() != "<f4") throw bad(name + ": dtype is not <f4");
      const auto& declared = a.at("shape");
      if (!declared.is_array() || declared.size() != shape.size())
        throw bad(name + ": shape does not match the architecture");
      for (std::size_t i = 0; i < shape.size(); ++i)
        if (!declared[i].is_number_integer() || declared[i].get<std::int64_t>() != shape[i])
          throw bad(name + ": shape does not match the architecture");
      std::vector<unsigned char> bytes;
      if (!base64_decode(a.at("base64").get<std::string>(), bytes)) throw bad(name + ": bad base64");
      std::int64_t n = 1;
      for (auto s : shape) n *= s;
      if (static_cast<std::int64_t>(bytes.size()) != n * 4)
        throw bad(name + ": holds " + std::to_string(bytes.size()) + " bytes, expected " +
                  std::to_string(n * 4));
      std::vector<float> v(n);
      std::memcpy(v.data(), bytes.data(), bytes.size());
      for (float f : v)
        if (!std::isfinite(f)) throw bad(name + ": non-finite value");
      return v;
    };
    m.mean = array(j.at("standardize").at("mean"), {m.inputs}, "standardize.mean");
    m.scale = array(j.at("standardize").at("scale"), {m.inputs}, "standardize.scale");
    const auto& layers = j.at("layers");
    if (!layers.is_array() || layers.size() != m.hidden.size() + 1)
      throw bad("layer count does not match the hidden sizes");
    std::int64_t in = m.inputs;
    for (std::size_t l = 0; l < layers.size(); ++l) {
      layer L;
      L.in = in;
      L.out = l < m.hidden.size() ? m.hidden[l] : m.classes;
      const std::string name = "layers[" + std::to_string(l) + "]";
      L.weight = array(layers[l].at("weight"), {L.out, L.in}, name + ".weight");
      L.bias = array(layers[l].at("bias"), {L.out}, name + ".bias");
      in = L.out;
      m.layers.push_back(std::move(L));
    }
    return m;
  } catch (const nlohmann::json::exception& e) {
    // type errors and missing keys: name the key from nlohmann's message
    throw bad(e.what());
  }
}

model load_model(const std::string& path) { return model_from_json(read_file(path), path); }

}  // namespace softce::cli
