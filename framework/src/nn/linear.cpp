// Linear layer with an optional adapter; see linear.hpp.
#include "peftfw/nn/linear.hpp"

#include <torch/torch.h>

namespace peftfw::nn {

LinearImpl::LinearImpl(int64_t in_features, int64_t out_features, bool has_bias)
    : in_features_(in_features), out_features_(out_features) {
  weight = register_parameter("weight", torch::empty({out_features, in_features}));
  if (has_bias) bias = register_parameter("bias", torch::zeros({out_features}));
}

torch::Tensor LinearImpl::base_forward(const torch::Tensor& x) const {
  return torch::nn::functional::linear(x, weight, bias);
}

torch::Tensor LinearAdapter::forward_from_input(const torch::Tensor& x, const LinearImpl& base) {
  return forward(x, base.base_forward(x), base);
}

torch::Tensor LinearImpl::forward(const torch::Tensor& x) {
  return adapter_ ? adapter_->forward_from_input(x, *this) : base_forward(x);
}

std::vector<std::pair<std::string, std::shared_ptr<LinearImpl>>> named_linears(
    torch::nn::Module& root) {
  std::vector<std::pair<std::string, std::shared_ptr<LinearImpl>>> out;
  for (const auto& item : root.named_modules("", /*include_self=*/false)) {
    if (auto lin = std::dynamic_pointer_cast<LinearImpl>(item.value()))
      out.emplace_back(item.key(), lin);
  }
  return out;
}

}  // namespace peftfw::nn
