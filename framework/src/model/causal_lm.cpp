// Shared pieces of the model contract.
#include "peftfw/model/causal_lm.hpp"

#include <torch/torch.h>

namespace peftfw {

torch::Tensor causal_lm_loss(const torch::Tensor& logits, const torch::Tensor& labels) {
  // Tokens < n predict token n: drop the last logit row and the first label.
  const auto V = logits.size(-1);
  auto shift_logits = logits.narrow(1, 0, logits.size(1) - 1).to(torch::kFloat32);
  auto shift_labels = labels.narrow(1, 1, labels.size(1) - 1);
  return torch::nn::functional::cross_entropy(
      shift_logits.reshape({-1, V}), shift_labels.reshape({-1}),
      torch::nn::functional::CrossEntropyFuncOptions().ignore_index(-100));
}

}  // namespace peftfw
