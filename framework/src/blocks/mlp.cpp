// MLP (fused, split or plain layouts; SiLU or squared ReLU) and top-k MoE blocks.
#include "peftfw/blocks/mlp.hpp"

#include <torch/torch.h>

#include "peftfw/kernels/ops.hpp"

namespace peftfw::blocks {

namespace F = torch::nn::functional;

namespace {
const char* kExpertsWhy =
    "3D expert weights [experts, out, in] are not nn.Linear modules; PEFT adapts them through "
    "target_parameters, which peftfw does not support yet";

torch::Tensor act(Activation a, const torch::Tensor& x) {
  if (a == Activation::Silu) return F::silu(x);
  return torch::relu(x).pow(2);
}
}  // namespace

MlpImpl::MlpImpl(MlpOptions o) : o_(o) {
  const int64_t H = o_.hidden_size, Fi = o_.intermediate_size;
  switch (o_.layout) {
    case MlpOptions::Layout::Fused:
      input_linear = add("input_linear", nn::Linear(H, 2 * Fi, o_.bias), linear("mlp.input"));
      output_linear = add("output_linear", nn::Linear(Fi, H, o_.bias), linear("mlp.output"));
      break;
    case MlpOptions::Layout::Split:
      gate_proj = add("gate_proj", nn::Linear(H, Fi, o_.bias), linear("mlp.gate"));
      up_proj = add("up_proj", nn::Linear(H, Fi, o_.bias), linear("mlp.up"));
      down_proj = add("down_proj", nn::Linear(Fi, H, o_.bias), linear("mlp.down"));
      break;
    case MlpOptions::Layout::Plain:
      up_proj = add("up_proj", nn::Linear(H, Fi, o_.bias), linear("mlp.up"));
      down_proj = add("down_proj", nn::Linear(Fi, H, o_.bias), linear("mlp.down"));
      break;
  }
}

torch::Tensor MlpImpl::forward(const torch::Tensor& x, const ForwardContext&, LayerCache*) {
  return forward(x);
}

torch::Tensor MlpImpl::forward(const torch::Tensor& x) {
  switch (o_.layout) {
    case MlpOptions::Layout::Fused: {
      auto gu = input_linear(x);
      // silu(gate) * up with gate the first half, in one kernel on CUDA.
      if (o_.activation == Activation::Silu) return output_linear(kernels::silu_mul(gu));
      auto parts = gu.chunk(2, -1);
      return output_linear(act(o_.activation, parts[0]) * parts[1]);
    }
    case MlpOptions::Layout::Split:
      return down_proj(act(o_.activation, gate_proj(x)) * up_proj(x));
    case MlpOptions::Layout::Plain:
      return down_proj(act(o_.activation, up_proj(x)));
  }
  return x;
}

MoeImpl::RouterImpl::RouterImpl(int64_t hidden, int64_t experts) {
  layer = add("layer", nn::Linear(hidden, experts, false), linear("moe.router"));
}

MoeImpl::MoeImpl(MoeOptions o) : o_(o) {
  router = register_module("router", std::make_shared<RouterImpl>(o_.hidden_size, o_.num_experts));
  input_linear = add("input_linear",
                     Weights(std::vector<int64_t>{o_.num_experts, 2 * o_.intermediate_size, o_.hidden_size}),
                     Tag{"experts", "moe.experts.input", kExpertsWhy, ""});
  output_linear = add("output_linear",
                      Weights(std::vector<int64_t>{o_.num_experts, o_.hidden_size, o_.intermediate_size}),
                      Tag{"experts", "moe.experts.output", kExpertsWhy, ""});
}

torch::Tensor MoeImpl::forward(const torch::Tensor& h, const ForwardContext&, LayerCache*) {
  const auto sizes = h.sizes().vec();
  auto x = h.reshape({-1, o_.hidden_size});
  // Top-k on raw router logits (float32), softmax over the k selected only.
  auto logits = router->layer(x).to(torch::kFloat32);
  auto top = logits.topk(o_.top_k, -1);
  auto top_w = torch::softmax(std::get<0>(top), -1).to(x.scalar_type());
  auto top_i = std::get<1>(top);
  auto out = torch::zeros_like(x);
  for (int64_t e = 0; e < o_.num_experts; ++e) {
    auto hit = top_i.eq(e).nonzero();  // [n,2]: (token, slot)
    if (hit.size(0) == 0) continue;
    auto tok = hit.select(1, 0), slot = hit.select(1, 1);
    auto gu = F::linear(x.index_select(0, tok), input_linear->weight[e]).chunk(2, -1);
    auto y = F::linear(F::silu(gu[0]) * gu[1], output_linear->weight[e]);
    y = y * top_w.index({tok, slot}).unsqueeze(-1);
    out = out.index_add(0, tok, y.to(out.scalar_type()));
  }
  return out.view(sizes);
}

}  // namespace peftfw::blocks
