// softce example: soft-label cross-entropy with its gradient in one call, class-index
// targets with label smoothing, and knowledge distillation.
#include <softce/softce.hpp>

#include <cstdint>
#include <cstdio>

int main() {
  // logits (N = 2 rows, C = 3 classes) and soft targets (class probabilities)
  const float logits[2][3] = {{2.0f, 1.0f, 0.1f}, {0.5f, 2.5f, -1.0f}};
  const float target[2][3] = {{0.7f, 0.2f, 0.1f}, {0.0f, 0.9f, 0.1f}};
  float grad[2][3];  // d loss / d logits, written in the same pass

  softce::outputs out;
  out.grad = softce::view(&grad[0][0], {2, 3});
  const double loss = softce::cross_entropy(softce::view(&logits[0][0], {2, 3}),
                                            softce::view(&target[0][0], {2, 3}), {}, out);
  std::printf("cross_entropy = %.4f\n", loss);
  std::printf("grad[0] = %.4f %.4f %.4f\n", grad[0][0], grad[0][1], grad[0][2]);

  // class-index targets with label smoothing, as torch.nn.functional.cross_entropy
  const std::int64_t labels[2] = {0, 1};
  softce::cross_entropy_options smoothing;
  smoothing.label_smoothing = 0.1;
  const double smoothed = softce::cross_entropy(softce::view(&logits[0][0], {2, 3}),
                                                softce::view(labels, {2}), smoothing);
  std::printf("label_smoothing = %.4f\n", smoothed);

  // distillation: T^2 KL(softmax(teacher / T) || softmax(student / T)), averaged over rows
  const float teacher[2][3] = {{1.5f, 1.2f, 0.0f}, {0.0f, 3.0f, -2.0f}};
  softce::distillation_options kd;
  kd.temperature = 2.0;
  const double distill = softce::distillation_loss(softce::view(&logits[0][0], {2, 3}),
                                                   softce::view(&teacher[0][0], {2, 3}), kd);
  std::printf("distillation = %.4f\n", distill);
  return 0;
}
