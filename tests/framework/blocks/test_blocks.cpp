// The shared blocks on their own: layers with parallel mixers and mixer x feed-forward units,
// the inventory read off the module tree, and the meta-device description.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "peftfw/blocks/attention.hpp"
#include "peftfw/blocks/decoder.hpp"
#include "peftfw/blocks/mamba2_mixer.hpp"
#include "peftfw/blocks/mlp.hpp"
#include "peftfw/error.hpp"
#include "peftfw/io/tensor_bridge.hpp"
#include "peftfw/model/loader.hpp"
#include "peftfw/model/merge.hpp"
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

// A grouped-router MoE layer whose checkpoints store every tensor renamed ("stored." prefix)
// and the stacked expert weights as one key per expert: the merged state writes those keys,
// loading reads them back (slices stacked in order), the router's selection bias is a
// checkpointed buffer that stays float32 when the model is cast, and a missing slice is named.
std::shared_ptr<HybridLM> grouped_moe_model() {
  LMOptions lm;
  lm.architecture = lm.model_type = "test_grouped_moe";
  lm.vocab_size = 64;
  lm.hidden_size = kHidden;
  lm.stored_as = [](const std::string& name, int64_t leading) -> std::vector<std::string> {
    if (name.find(".experts.") == std::string::npos) return {"stored." + name};
    std::vector<std::string> keys;
    for (int64_t e = 0; e < leading; ++e) keys.push_back(name + ".slice" + std::to_string(e));
    return keys;
  };
  auto model = std::make_shared<HybridLM>(lm);
  GroupedMoeOptions o;
  o.hidden_size = kHidden;
  o.num_experts = 4;
  o.top_k = 2;
  o.intermediate_size = 8;
  o.n_group = 2;
  o.topk_group = 1;
  o.latent_size = 16;
  o.shared_intermediate_size = 12;
  auto l0 = std::make_shared<DecoderLayerImpl>(0, LayerOptions{kHidden, 1e-6, 1.0, false});
  l0->add_unit("norm", "norm.input", {{"mixer", std::make_shared<GroupedMoeImpl>(o)}});
  model->add_layer(l0);
  model->finish();
  return model;
}

TEST(Blocks, StoredAsKeysRoundTripAndTheRouterBiasStaysFloat32) {
  auto model = grouped_moe_model();
  model->init_random(3, 0.2);
  auto* moe = model->named_modules()["model.layers.0.mixer"]->as<GroupedMoeImpl>();
  ASSERT_NE(moe, nullptr);
  {
    torch::NoGradGuard ng;
    moe->gate->e_score_correction_bias.copy_(torch::tensor({0.25f, -0.5f, 0.125f, 1.0f}));
  }
  const auto& inv = model->inventory();
  ASSERT_EQ(inv.buffers.size(), 1u);
  EXPECT_EQ(inv.buffers[0].name, "model.layers.0.mixer.gate.e_score_correction_bias");
  auto tensors = to_checkpoint_keys(inv, merged_state_dict(*model));
  const std::string up = "model.layers.0.mixer.experts.up_proj";
  EXPECT_EQ(tensors.count(up), 0u);
  ASSERT_EQ(tensors.count(up + ".slice2"), 1u);
  EXPECT_TRUE(torch::equal(tensors.at(up + ".slice2"), moe->experts->up_proj[2]));
  ASSERT_EQ(tensors.count("stored.model.layers.0.mixer.gate.e_score_correction_bias"), 1u);
  EXPECT_EQ(tensors.count("stored.lm_head.weight"), 1u);

  const auto dir = std::filesystem::temp_directory_path() / "peftfw_blocks_stored_as";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  io::save_checkpoint_tensors(dir.string(), tensors);
  auto loaded = grouped_moe_model();
  load_weights(*loaded, dir);
  auto want = model->named_parameters();
  for (const auto& p : loaded->named_parameters())
    EXPECT_TRUE(torch::equal(p.value(), want[p.key()])) << p.key();
  auto* moe2 = loaded->named_modules()["model.layers.0.mixer"]->as<GroupedMoeImpl>();
  EXPECT_TRUE(torch::equal(moe2->gate->e_score_correction_bias, moe->gate->e_score_correction_bias));

  loaded->to(torch::kBFloat16);
  EXPECT_EQ(moe2->gate->e_score_correction_bias.scalar_type(), torch::kFloat32);
  EXPECT_EQ(moe2->gate->weight.scalar_type(), torch::kBFloat16);

  // One expert slice missing: the error names the parameter and the absent key.
  tensors.erase(up + ".slice3");
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  io::save_checkpoint_tensors(dir.string(), tensors);
  try {
    load_weights(*grouped_moe_model(), dir);
    FAIL() << "a missing expert slice was accepted";
  } catch (const InputError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find(up + " (stored as " + up + ".slice3)"), std::string::npos) << what;
    EXPECT_EQ(what.find("unexpected"), std::string::npos) << what;  // slices 0-2 are claimed by it
  }
  std::filesystem::remove_all(dir);
}

// Routing inside the best expert group: with n_group 2 and topk_group 1 every token's experts
// come from one group, the one whose two best (bias-shifted) scores sum highest; the weights
// are the sigmoid scores without the bias, normalised. Checked against the formula by hand.
TEST(Blocks, GroupedRouterPicksInsideTheBestGroup) {
  auto model = grouped_moe_model();
  model->init_random(4, 0.3);
  auto* moe = model->named_modules()["model.layers.0.mixer"]->as<GroupedMoeImpl>();
  torch::NoGradGuard ng;
  moe->gate->e_score_correction_bias.copy_(torch::tensor({0.0f, 0.3f, -0.2f, 0.1f}));
  auto x = torch::randn({1, 6, kHidden});
  auto got = moe->forward(x, ForwardContext{}, nullptr);
  auto flat = x.reshape({-1, kHidden});
  auto scores = torch::sigmoid(torch::matmul(flat, moe->gate->weight.t()));
  auto choice = scores + moe->gate->e_score_correction_bias;
  auto u = moe->fc1_latent_proj->forward(flat);
  auto want = torch::zeros({flat.size(0), 16});
  for (int64_t t = 0; t < flat.size(0); ++t) {
    const double g0 = choice[t][0].item<double>() + choice[t][1].item<double>();
    const double g1 = choice[t][2].item<double>() + choice[t][3].item<double>();
    const int64_t base = g0 >= g1 ? 0 : 2;  // each group holds 2 experts: both are its "top 2"
    const double w0 = scores[t][base].item<double>(), w1 = scores[t][base + 1].item<double>();
    for (int64_t k = 0; k < 2; ++k) {
      const int64_t e = base + k;
      auto y = torch::matmul(torch::relu(torch::matmul(u[t], moe->experts->up_proj[e].t())).pow(2),
                             moe->experts->down_proj[e].t());
      want[t] += y * ((k == 0 ? w0 : w1) / (w0 + w1 + 1e-20));
    }
  }
  auto expect = moe->fc2_latent_proj->forward(want) + moe->shared_experts->forward(flat);
  EXPECT_LE((got.reshape({-1, kHidden}) - expect).abs().max().item<double>(), 1e-5);
}

}  // namespace
}  // namespace peftfw::blocks
