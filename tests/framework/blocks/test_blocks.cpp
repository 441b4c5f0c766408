// The shared blocks on their own: layers with parallel mixers and mixer x feed-forward units,
// the inventory read off the module tree, and the meta-device description.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "peftfw/blocks/attention.hpp"
#include "peftfw/blocks/decoder.hpp"
#include "peftfw/blocks/mamba2_mixer.hpp"
#include "peftfw/blocks/mlp.hpp"
#include "peftfw/nn/param_init.hpp"

namespace peftfw::blocks {
namespace {

constexpr int64_t kHidden = 32;

Mamba2MixerOptions mixer_options() {
  Mamba2MixerOptions m;
  m.hidden_size = kHidden;
  m.num_heads = 4;
  m.head_dim = 16;
  m.state_size = 8;
  m.chunk_size = 8;
  return m;
}

AttentionOptions attention_options() {
  AttentionOptions a;
  a.hidden_size = kHidden;
  a.num_heads = 4;
  a.num_kv_heads = 2;
  a.head_dim = 8;
  return a;
}

MlpOptions mlp_options() {
  MlpOptions f;
  f.hidden_size = kHidden;
  f.intermediate_size = 48;
  return f;
}

// Two layers: attention || mamba in parallel with multipliers, then an MLP; then mamba x MoE.
std::shared_ptr<HybridLM> parallel_model() {
  LMOptions lm;
  lm.architecture = lm.model_type = "test_parallel";
  lm.vocab_size = 64;
  lm.hidden_size = kHidden;
  auto model = std::make_shared<HybridLM>(lm);
  LayerOptions layer{kHidden, 1e-6, 1.0, false};
  auto l0 = std::make_shared<DecoderLayerImpl>(0, layer);
  l0->add_unit("input_layernorm", "norm.input",
               {{"self_attn", std::make_shared<AttentionImpl>(attention_options()), 1.0, 0.5},
                {"mamba", std::make_shared<Mamba2MixerImpl>(mixer_options()), 2.0, 0.25}});
  l0->add_unit("pre_ff_layernorm", "norm.ff", {{"feed_forward", std::make_shared<MlpImpl>(mlp_options())}});
  model->add_layer(l0);
  auto l1 = std::make_shared<DecoderLayerImpl>(1, layer);
  l1->set_kind("mamba+moe");
  l1->add_unit("input_layernorm", "norm.input", {{"mamba", std::make_shared<Mamba2MixerImpl>(mixer_options())}});
  l1->add_unit("pre_ff_layernorm", "norm.ff",
               {{"moe", std::make_shared<MoeImpl>(MoeOptions{kHidden, 4, 2, 16})}});
  model->add_layer(l1);
  model->finish();
  return model;
}

TEST(Blocks, InventoryExpressesParallelMixersAndMixerTimesFeedForward) {
  auto model = parallel_model();
  const auto& inv = model->inventory();
  ASSERT_EQ(inv.layer_kinds, (std::vector<std::string>{"attention|mamba", "mamba+moe"}));
  ASSERT_EQ(inv.layer_parts.size(), 2u);
  EXPECT_EQ(inv.layer_parts[0], (LayerParts{{"attention", "mamba"}, {"mlp"}}));
  EXPECT_EQ(inv.layer_parts[1], (LayerParts{{"mamba"}, {"moe"}}));
  const auto* m = inv.find_module("model.layers.0.mamba.in_proj");
  ASSERT_NE(m, nullptr);
  EXPECT_EQ(m->local_name, "mamba.in_proj");
  EXPECT_EQ(m->layer, 0);
  EXPECT_EQ(m->layer_kind, "attention|mamba");
  EXPECT_TRUE(m->adaptable);
  // Every parameter is listed once, with its SSM group where it has one.
  EXPECT_EQ(inv.params.size(), model->named_parameters().size());
  int64_t ssm = 0;
  for (const auto& p : inv.params) ssm += !p.ssm_group.empty();
  EXPECT_EQ(ssm, 2 * 5);  // two mixers: A_log, D, dt_bias, conv1d.weight and conv1d.bias
  // Defaults: every adaptable projection inside the layers except the router.
  EXPECT_NE(std::find(inv.default_targets.begin(), inv.default_targets.end(), "attention.q"),
            inv.default_targets.end());
  EXPECT_EQ(std::find(inv.default_targets.begin(), inv.default_targets.end(), "moe.router"),
            inv.default_targets.end());
}

// The parallel unit is h + 0.5 * attn(norm(h)) + 0.25 * mamba(2 * norm(h)), then the MLP unit.
TEST(Blocks, ParallelMixersSumTheirScaledOutputs) {
  torch::manual_seed(0);
  auto model = parallel_model();
  model->init_random(1, 0.2);
  model->eval();
  torch::NoGradGuard ng;
  auto layers = model->named_children();
  auto backbone = std::dynamic_pointer_cast<BackboneImpl>(model->named_children()["model"]);
  ASSERT_TRUE(backbone);
  auto layer = backbone->layers->ptr<DecoderLayerImpl>(0);
  auto children = layer->named_children();
  auto norm1 = std::dynamic_pointer_cast<RMSNormImpl>(children["input_layernorm"]);
  auto norm2 = std::dynamic_pointer_cast<RMSNormImpl>(children["pre_ff_layernorm"]);
  auto attn = std::dynamic_pointer_cast<AttentionImpl>(children["self_attn"]);
  auto mamba = std::dynamic_pointer_cast<Mamba2MixerImpl>(children["mamba"]);
  auto mlp = std::dynamic_pointer_cast<MlpImpl>(children["feed_forward"]);
  ASSERT_TRUE(norm1 && norm2 && attn && mamba && mlp);
  auto h = torch::randn({2, 11, kHidden});
  ForwardContext ctx;
  auto got = layer->forward(h, ctx, nullptr);
  auto x = norm1->forward(h);
  auto mid = h + 0.5 * attn->forward(x, ctx, nullptr) + 0.25 * mamba->forward(2.0 * x, ctx, nullptr);
  auto want = mid + mlp->forward(norm2->forward(mid));
  EXPECT_LE((got - want).abs().max().item<double>(), 1e-5);
}

// Inside a MetaScope nothing is allocated: a 4096-wide, 64-layer Mamba-2 stack is described
// from meta tensors, and the count is the formula's.
TEST(Blocks, MetaScopeDescribesWithoutStorage) {
  nn::MetaScope meta;
  LMOptions lm;
  lm.architecture = lm.model_type = "test_meta";
  lm.vocab_size = 32768;
  lm.hidden_size = 4096;
  auto model = std::make_shared<HybridLM>(lm);
  Mamba2MixerOptions m;
  m.hidden_size = 4096, m.num_heads = 128, m.head_dim = 64, m.n_groups = 8, m.state_size = 128;
  for (int64_t i = 0; i < 64; ++i) {
    auto l = std::make_shared<DecoderLayerImpl>(i, LayerOptions{4096, 1e-5, 1.0, true});
    l->add_unit("norm", "norm.input", {{"mixer", std::make_shared<Mamba2MixerImpl>(m)}});
    model->add_layer(l);
  }
  model->finish();
  for (const auto& p : model->parameters()) ASSERT_TRUE(p.is_meta());
  // Per layer: norm H, in_proj H x (2*8192 + 2*8*128 + 128), conv (8192 + 2048) x 4 + bias,
  // dt_bias/A_log/D 3*128, gated norm 8192, out_proj 8192 x H; plus embedding, norm_f, lm_head.
  const int64_t H = 4096, I = 8192, CD = I + 2 * 8 * 128, P = 2 * I + 2 * 8 * 128 + 128;
  const int64_t layer = H + H * P + CD * 4 + CD + 3 * 128 + I + I * H;
  EXPECT_EQ(model->inventory().total_params(), 64 * layer + 2 * 32768 * H + H);
  EXPECT_EQ(model->inventory().total_params(), 7285403648);  // transformers' Mamba2Config()
}

// Pure Mamba-2's d_mlp channels: silu(z0) * x0 joins the scan output before out_proj.
TEST(Blocks, Mamba2DmlpChannelsPassThroughTheirGate) {
  torch::manual_seed(0);
  auto o = mixer_options();
  o.d_mlp = 6;
  auto mixer = std::make_shared<Mamba2MixerImpl>(o);
  torch::NoGradGuard ng;
  for (auto& p : mixer->parameters()) p.normal_(0, 0.2);
  auto h = torch::randn({1, 5, kHidden});
  ForwardContext ctx;
  auto got = mixer->forward(h, ctx, nullptr);
  // Zero the out_proj columns of the SSM part: what is left is out_proj on silu(z0) * x0.
  mixer->out_proj->weight.narrow(1, o.d_mlp, o.inner()).zero_();
  auto only_mlp = mixer->forward(h, ctx, nullptr);
  auto proj = mixer->in_proj->forward(h);
  auto z0 = proj.narrow(-1, 0, o.d_mlp), x0 = proj.narrow(-1, o.d_mlp, o.d_mlp);
  auto want = torch::nn::functional::linear(torch::silu(z0) * x0, mixer->out_proj->weight.narrow(1, 0, o.d_mlp));
  EXPECT_LE((only_mlp - want).abs().max().item<double>(), 1e-5);
  EXPECT_GT((got - only_mlp).abs().max().item<double>(), 1e-3);  // the SSM part contributes
}

}  // namespace
}  // namespace peftfw::blocks
