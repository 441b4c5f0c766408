// Block base, tags, Weights and RMSNorm.
#include "peftfw/blocks/module.hpp"

#include <torch/torch.h>

#include "peftfw/kernels/ops.hpp"
#include "peftfw/nn/param_init.hpp"

namespace peftfw::blocks {

Tag linear(const std::string& role) { return Tag{"linear", role, "", ""}; }

torch::Dtype dtype_of(const std::string& name) {
  return name == "bfloat16" ? torch::kBFloat16 : name == "float16" ? torch::kFloat16 : torch::kFloat32;
}

Tag norm(const std::string& role) {
  return Tag{"norm", role, "norm weights are vectors; train them with method \"full\"", ""};
}

Tag ssm_conv1d(const std::string& role) {
  return Tag{"conv1d", role,
             "depthwise conv1d (groups = channels): LoRA would need r divisible by the channel count, and "
             "fused Mamba kernels read its weight directly; train it fully with [ssm] train = [\"conv1d\"]",
             "conv1d"};
}

torch::Tensor BlockImpl::add_parameter(const std::string& name, torch::Tensor value,
                                       const std::string& ssm_group) {
  if (!ssm_group.empty()) groups_[name] = ssm_group;
  return register_parameter(name, std::move(value));
}

WeightsImpl::WeightsImpl(std::vector<int64_t> weight_shape, std::vector<int64_t> bias_shape) {
  weight = register_parameter("weight", torch::ones(weight_shape, nn::param_options()));
  if (!bias_shape.empty()) bias = register_parameter("bias", torch::zeros(bias_shape, nn::param_options()));
}

RMSNormImpl::RMSNormImpl(int64_t dim, double eps_) : eps(eps_) {
  weight = register_parameter("weight", torch::ones({dim}, nn::param_options()));
}

// The gated norm without a gate, so CUDA tensors get its fused kernel.
torch::Tensor RMSNormImpl::forward(const torch::Tensor& x) {
  return kernels::gated_rms_norm(x, torch::Tensor(), weight, eps);
}

}  // namespace peftfw::blocks
