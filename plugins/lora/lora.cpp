// LoRA / DoRA math, following HF PEFT's tuners/lora/layer.py (Linear) and
// tuners/lora/dora.py (DoraLinearLayer) so that adapters trained here load
// into PEFT with the same outputs and vice versa.
#include "lora.hpp"

#include <cmath>

namespace peftfw::lora {

namespace F = torch::nn::functional;

LoraAdapter::LoraAdapter(const LoraOptions& options, torch::nn::Linear A, torch::nn::Linear B)
    : options_(options),
      scaling_(options.use_rslora ? options.alpha / std::sqrt(static_cast<double>(options.r))
                                  : options.alpha / static_cast<double>(options.r)),
      A_(std::move(A)),
      B_(std::move(B)) {}

std::shared_ptr<LoraAdapter> LoraAdapter::attach(nn::LinearImpl& host, const LoraOptions& options) {
  TORCH_CHECK(!host.adapter(), "module already has an adapter");
  const auto device = host.weight.device();
  auto A = torch::nn::Linear(torch::nn::LinearOptions(host.in_features(), options.r).bias(false));
  auto B = torch::nn::Linear(torch::nn::LinearOptions(options.r, host.out_features()).bias(false));
  {
    torch::NoGradGuard no_grad;
    // PEFT's init: A Kaiming-uniform (a = sqrt(5), as nn.Linear), B zero.
    torch::nn::init::kaiming_uniform_(A->weight, std::sqrt(5.0));
    B->weight.zero_();
  }
  A->to(device, torch::kFloat32);
  B->to(device, torch::kFloat32);
  host.register_module("lora_A", A);
  host.register_module("lora_B", B);
  std::shared_ptr<LoraAdapter> adapter(new LoraAdapter(options, A, B));
  if (options.dora) {
    torch::Tensor magnitude;
    {
      torch::NoGradGuard no_grad;
      magnitude = adapter->weight_norm(host).clone();  // initialised to ||W|| (B = 0)
    }
    adapter->magnitude_ = host.register_parameter("lora_magnitude_vector", magnitude);
  }
  host.set_adapter(adapter);
  return adapter;
}

torch::Tensor LoraAdapter::weight_norm(const nn::LinearImpl& base) const {
  auto w = base.weight.to(torch::kFloat32) + scaling_ * torch::matmul(B_->weight, A_->weight);
  return w.norm(2, /*dim=*/1);
}

torch::Tensor LoraAdapter::forward(const torch::Tensor& x, const torch::Tensor& base_out,
                                   const nn::LinearImpl& base) {
  const bool training = A_->is_training();
  const bool drop = training && options_.dropout > 0.0;
  if (!options_.dora && !options_.float32_math && base_out.scalar_type() != torch::kFloat32) {
    // 16-bit model: the adapter's math in the model's dtype (tensor-core GEMMs, half the
    // traffic); the float32 A and B are cast, so their gradients arrive in float32.
    const auto dt = base_out.scalar_type();
    auto xd = x.to(dt);
    if (drop) xd = F::dropout(xd, F::DropoutFuncOptions().p(options_.dropout).training(true));
    auto lora = F::linear(F::linear(xd, A_->weight.to(dt)), (B_->weight * scaling_).to(dt));
    return base_out + lora;
  }
  auto xa = x.to(torch::kFloat32);  // PEFT casts the input to the adapter's dtype
  if (drop) xa = F::dropout(xa, F::DropoutFuncOptions().p(options_.dropout).training(true));
  auto lora = B_(A_(xa));
  if (!options_.dora) return base_out + (lora * scaling_).to(base_out.scalar_type());

  // DoRA: the weight norm is detached (PEFT, following the DoRA paper's section 4.3).
  auto norm = weight_norm(base).detach();
  auto mag_scale = (magnitude_ / norm).view({1, -1});
  torch::Tensor base_result;
  if (drop) {
    base_result = F::linear(xa, base.weight.to(torch::kFloat32));  // dropped-out input, no bias
  } else {
    base_result = base_out.to(torch::kFloat32);
    if (base.bias.defined()) base_result = base_result - base.bias.to(torch::kFloat32);
  }
  auto dora = (mag_scale - 1) * base_result + mag_scale * lora * scaling_;
  return base_out + dora.to(base_out.scalar_type());
}

torch::Tensor LoraAdapter::merged_weight(const nn::LinearImpl& base) const {
  torch::NoGradGuard no_grad;
  auto w = base.weight.to(torch::kFloat32) + scaling_ * torch::matmul(B_->weight, A_->weight);
  if (options_.dora) w = w * (magnitude_ / w.norm(2, 1)).unsqueeze(1);
  return w.to(base.weight.scalar_type());
}

}  // namespace peftfw::lora
