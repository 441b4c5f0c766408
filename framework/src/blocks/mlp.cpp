// MLP (fused, split or plain layouts; SiLU or squared ReLU) and top-k MoE blocks.
#include "peftfw/blocks/mlp.hpp"

#include <torch/torch.h>

#include <functional>
#include <limits>

#include "peftfw/kernels/ops.hpp"
#include "peftfw/nn/param_init.hpp"

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

// sum over a token's k picks of weight * expert(x): each expert runs once, on the tokens that picked
// it, in expert order (as transformers does), accumulated in `acc`. top_i, top_w: [tokens, k].
torch::Tensor mix_experts(const torch::Tensor& x, const torch::Tensor& top_i, const torch::Tensor& top_w,
                          int64_t experts, int64_t out_dim, torch::Dtype acc,
                          const std::function<torch::Tensor(int64_t, const torch::Tensor&)>& expert) {
  auto out = torch::zeros({x.size(0), out_dim}, x.options().dtype(acc));
  for (int64_t e = 0; e < experts; ++e) {
    auto hit = top_i.eq(e).nonzero();  // [n,2]: (token, slot)
    if (hit.size(0) == 0) continue;
    auto tok = hit.select(1, 0), slot = hit.select(1, 1);
    auto y = expert(e, x.index_select(0, tok)) * top_w.index({tok, slot}).unsqueeze(-1);
    out.index_add_(0, tok, y.to(acc));  // out is ours: in place
  }
  return out;
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
      if (o_.gate_multiplier != 1.0)
        return down_proj(act(o_.activation, gate_proj(x) * o_.gate_multiplier) * up_proj(x));
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
  auto out = mix_experts(x, top_i, top_w, o_.num_experts, o_.hidden_size, x.scalar_type(),
                         [&](int64_t e, const torch::Tensor& xs) {
                           auto gu = F::linear(xs, input_linear->weight[e]).chunk(2, -1);
                           return F::linear(F::silu(gu[0]) * gu[1], output_linear->weight[e]);
                         });
  return out.view(sizes);
}

// ---------------------------------------------------------------- softmax-then-top-k MoE

SoftmaxMoeImpl::ExpertsImpl::ExpertsImpl(int64_t experts, int64_t width, int64_t hidden) {
  gate_up_proj = add_parameter("gate_up_proj", torch::zeros({experts, 2 * width, hidden}, nn::param_options()));
  down_proj = add_parameter("down_proj", torch::zeros({experts, hidden, width}, nn::param_options()));
}

SoftmaxMoeImpl::SoftmaxMoeImpl(SoftmaxMoeOptions o) : o_(o) {
  TORCH_CHECK(o_.top_k >= 1 && o_.top_k <= o_.num_experts, "SoftmaxMoeOptions: 1 <= top_k <= num_experts");
  router = add("router", nn::Linear(o_.hidden_size, o_.num_experts, false), linear("moe.router"));
  experts = add("experts", std::make_shared<ExpertsImpl>(o_.num_experts, o_.intermediate_size, o_.hidden_size),
                Tag{"experts", "moe.experts", kExpertsWhy, ""});
}

torch::Tensor SoftmaxMoeImpl::forward(const torch::Tensor& h, const ForwardContext& ctx, LayerCache*) {
  const auto sizes = h.sizes().vec();
  auto x = h.reshape({-1, o_.hidden_size});
  auto logits = router(x);
  if (ctx.router_logits) ctx.router_logits->push_back({logits, o_.top_k});
  auto probs = torch::softmax(logits.to(torch::kFloat32), -1);
  auto top = probs.topk(o_.top_k, -1);
  auto top_w = std::get<0>(top).to(x.scalar_type());  // not renormalised
  auto out = mix_experts(x, std::get<1>(top), top_w, o_.num_experts, o_.hidden_size, x.scalar_type(),
                         [&](int64_t e, const torch::Tensor& xs) {
                           auto gu = F::linear(xs, experts->gate_up_proj[e]).chunk(2, -1);
                           return F::linear(F::silu(gu[0]) * gu[1], experts->down_proj[e]);
                         });
  return out.view(sizes);
}

// ---------------------------------------------------------------- grouped sigmoid MoE

GroupedMoeImpl::RouterImpl::RouterImpl(int64_t hidden, int64_t experts) {
  weight = add_parameter("weight", torch::zeros({experts, hidden}, nn::param_options()));
  e_score_correction_bias =
      register_buffer("e_score_correction_bias", torch::zeros({experts}, nn::param_options().dtype(torch::kFloat32)));
}

void GroupedMoeImpl::RouterImpl::to(torch::Device device, torch::Dtype dtype, bool non_blocking) {
  auto keep = e_score_correction_bias.detach().clone();
  BlockImpl::to(device, dtype, non_blocking);
  e_score_correction_bias.set_data(keep.to(device, torch::kFloat32));
}

void GroupedMoeImpl::RouterImpl::to(torch::Dtype dtype, bool non_blocking) {
  auto keep = e_score_correction_bias.detach().clone();
  BlockImpl::to(dtype, non_blocking);
  e_score_correction_bias.set_data(keep.to(torch::kFloat32));
}

GroupedMoeImpl::ExpertsImpl::ExpertsImpl(int64_t experts, int64_t width, int64_t in) {
  up_proj = add_parameter("up_proj", torch::zeros({experts, width, in}, nn::param_options()));
  down_proj = add_parameter("down_proj", torch::zeros({experts, in, width}, nn::param_options()));
}

GroupedMoeImpl::GroupedMoeImpl(GroupedMoeOptions o) : o_(o) {
  const int64_t H = o_.hidden_size, in = o_.latent_size > 0 ? o_.latent_size : H;
  TORCH_CHECK(o_.num_experts % o_.n_group == 0 && o_.top_k <= o_.num_experts,
              "GroupedMoeOptions: n_group must divide num_experts and top_k <= num_experts");
  experts = add("experts", std::make_shared<ExpertsImpl>(o_.num_experts, o_.intermediate_size, in),
                Tag{"experts", "moe.experts", kExpertsWhy, ""});
  gate = add("gate", std::make_shared<RouterImpl>(H, o_.num_experts),
             Tag{"router", "moe.router", "the router picks the experts; train it with method \"full\"", ""});
  if (o_.shared_intermediate_size > 0) {
    MlpOptions s;
    s.layout = MlpOptions::Layout::Plain;
    s.hidden_size = H;
    s.intermediate_size = o_.shared_intermediate_size;
    s.activation = o_.activation;
    s.bias = o_.bias;
    shared_experts = register_module("shared_experts", std::make_shared<MlpImpl>(s));
  }
  if (o_.latent_size > 0) {
    fc1_latent_proj = add("fc1_latent_proj", nn::Linear(H, o_.latent_size, o_.bias), linear("moe.latent_in"));
    fc2_latent_proj = add("fc2_latent_proj", nn::Linear(o_.latent_size, H, o_.bias), linear("moe.latent_out"));
  }
}

torch::Tensor GroupedMoeImpl::forward(const torch::Tensor& h, const ForwardContext&, LayerCache*) {
  const auto sizes = h.sizes().vec();
  auto x = h.reshape({-1, o_.hidden_size});
  const int64_t E = o_.num_experts;
  // Router in float32: sigmoid scores choose (with the selection bias, inside the best groups);
  // the weights are the scores without the bias.
  auto scores = torch::sigmoid(F::linear(x.to(torch::kFloat32), gate->weight.to(torch::kFloat32)));
  auto choice = scores + gate->e_score_correction_bias.to(torch::kFloat32);
  if (o_.topk_group < o_.n_group) {
    auto grouped = choice.view({-1, o_.n_group, E / o_.n_group});
    auto group_scores = std::get<0>(grouped.topk(2, -1)).sum(-1);
    auto keep_groups = std::get<1>(group_scores.topk(o_.topk_group, -1));
    auto group_mask = torch::zeros_like(group_scores).scatter(1, keep_groups, 1.0);
    auto mask = group_mask.unsqueeze(-1).expand({-1, o_.n_group, E / o_.n_group}).reshape({-1, E});
    choice = choice.masked_fill(mask.logical_not(), -std::numeric_limits<float>::infinity());
  }
  auto top_i = std::get<1>(choice.topk(o_.top_k, -1));
  auto top_w = scores.gather(1, top_i);
  if (o_.norm_topk_prob) top_w = top_w / (top_w.sum(-1, true) + 1e-20);
  top_w = top_w * o_.routed_scaling_factor;

  auto u = fc1_latent_proj ? fc1_latent_proj(x) : x;
  // Weighted expert outputs summed in float32.
  auto out = mix_experts(u, top_i, top_w, o_.num_experts, u.size(1), torch::kFloat32,
                         [&](int64_t e, const torch::Tensor& us) {
                           return F::linear(act(o_.activation, F::linear(us, experts->up_proj[e])),
                                            experts->down_proj[e]);
                         });
  auto y = out.to(x.scalar_type());
  if (fc2_latent_proj) y = fc2_latent_proj(y);
  y = y.view(sizes);
  if (shared_experts) y = y + shared_experts->forward(h);
  return y;
}

}  // namespace peftfw::blocks
