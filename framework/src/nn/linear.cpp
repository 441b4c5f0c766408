// Linear layer with an optional adapter; see linear.hpp.
#include "peftfw/nn/linear.hpp"

#include <torch/torch.h>

#include "peftfw/nn/checkpoint.hpp"
#include "peftfw/nn/param_init.hpp"

namespace peftfw::nn {

namespace {
thread_local bool t_meta = false;
}

torch::TensorOptions param_options() {
  return t_meta ? torch::TensorOptions().device(torch::kMeta) : torch::TensorOptions();
}

MetaScope::MetaScope() : previous_(t_meta) { t_meta = true; }
MetaScope::~MetaScope() { t_meta = previous_; }

LinearImpl::LinearImpl(int64_t in_features, int64_t out_features, bool has_bias)
    : in_features_(in_features), out_features_(out_features) {
  weight = register_parameter("weight", torch::empty({out_features, in_features}, param_options()));
  if (has_bias) bias = register_parameter("bias", torch::zeros({out_features}, param_options()));
}

// at::linear, as PyTorch's F.linear: a biased projection of contiguous 3D input is one fused
// addmm (torch::nn::functional::linear would round matmul and bias add separately in bf16).
torch::Tensor LinearImpl::base_forward(const torch::Tensor& x) const {
  if (bias_after_product_ && bias.defined()) return at::linear(x, weight) + bias.to(x.scalar_type());
  return at::linear(x, weight, bias.defined() ? std::optional<torch::Tensor>(bias) : std::nullopt);
}

torch::Tensor LinearAdapter::forward_from_input(const torch::Tensor& x, const LinearImpl& base) {
  return forward(x, base.base_forward(x), base);
}

namespace {

// A frozen projection whose output is kept across a checkpoint's rerun (checkpoint.hpp):
// the rerun takes the kept output, and the backward needs only the weight, dx = dy W.
struct KeptLinearFn : public torch::autograd::Function<KeptLinearFn> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& weight, const std::optional<torch::Tensor>& bias) {
    ctx->save_for_backward({weight});
    if (auto kept = take_kept_output(x.numel() / weight.size(1), weight.size(0)); kept.defined()) return kept;
    auto out = at::linear(x, weight, bias);
    keep_projection_output(weight.size(1), weight.size(0), out);
    return out;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto weight = ctx->get_saved_variables()[0];
    return {grads[0].defined() ? torch::matmul(grads[0], weight) : torch::Tensor(), torch::Tensor(),
            torch::Tensor()};
  }
};

}  // namespace

torch::Tensor LinearImpl::forward(const torch::Tensor& x) {
  if (adapter_) return adapter_->forward_from_input(x, *this);
  const bool frozen = !weight.requires_grad() && (!bias.defined() || !bias.requires_grad());
  if (!frozen || bias_after_product_ || !may_keep(in_features_, out_features_)) return base_forward(x);
  std::optional<torch::Tensor> b;
  if (bias.defined()) b = bias;
  return KeptLinearFn::apply(x, weight, b);
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
