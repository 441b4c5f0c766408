// The sdt adapter plugin on a tiny Mamba-1 model and a tiny Granite hybrid (Mamba-2 heads):
// plan counts are the budgets' arithmetic and equal what apply trains; over 20 AdamW steps (with
// weight decay) only the selected entries move; the warm-up hands its delta to the real phase;
// adapter folders (peft) reload exactly, merged folds exactly, and init_from reads them back.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "peftfw/adapters/setup.hpp"
#include "peftfw/blocks/ssm_slots.hpp"
#include "peftfw/io/json_config.hpp"
#include "peftfw/model/causal_lm.hpp"
#include "peftfw/model/merge.hpp"
#include "peftfw/nn/linear.hpp"
#include "peftfw/plugin/architecture.hpp"
#include "peftfw/plugin/persistence.hpp"
#include "peftfw/plugin/registry.hpp"
#include "../../../plugins/sdt/selection.hpp"
#include "../../common/tiny_model.hpp"

using namespace peftfw;
namespace fs = std::filesystem;

namespace {

// Mamba-1: d_inner 32, d_state 8, dt_rank 2, 2 layers. Granite: one Mamba-2 layer of 4 heads.
const nlohmann::json kMamba = {{"model_type", "mamba"}, {"vocab_size", 64}, {"hidden_size", 16},
                               {"num_hidden_layers", 2}, {"state_size", 8}, {"expand", 2},
                               {"conv_kernel", 4}, {"time_step_rank", 2}};
const nlohmann::json kGranite = {
    {"model_type", "granitemoehybrid"}, {"vocab_size", 64}, {"hidden_size", 32}, {"num_hidden_layers", 2},
    {"layer_types", {"mamba", "attention"}}, {"num_attention_heads", 2}, {"num_key_value_heads", 1},
    {"shared_intermediate_size", 48}, {"num_local_experts", 0}, {"mamba_n_heads", 4}, {"mamba_d_head", 8},
    {"mamba_n_groups", 1}, {"mamba_d_state", 4}, {"mamba_chunk_size", 4}, {"mamba_expand", 1},
    {"tie_word_embeddings", true}};

std::shared_ptr<CausalLM> build(const nlohmann::json& c, uint64_t seed) { return peftfw::testing::tiny_random_model(c, seed); }

AdapterRequest sdt_request(std::vector<std::string> targets, std::map<std::string, recipe::Value> extra = {}) {
  std::map<std::string, recipe::Value> o = {{"sdt.warmup_iters", std::int64_t{2}}, {"sdt.channel_freeze", 0.75},
                                            {"sdt.state_freeze", 0.5},             {"sdt.lora_r", std::int64_t{2}},
                                            {"sdt.lora_alpha", 2.0},               {"sdt.lora_dropout", 0.0}};
  for (auto& [k, v] : extra) o[k] = v;
  AdapterRequest r;
  r.spec = adapter_spec("sdt", o);
  recipe::TargetPattern p;
  p.names = std::move(targets);
  r.targets.target_modules = p;
  return r;
}

// A warm-up result: one random delta per mixer, A_log's shape.
std::map<std::string, torch::Tensor> random_state(CausalLM& model, uint64_t seed) {
  torch::manual_seed(seed);
  std::map<std::string, torch::Tensor> s;
  for (const auto& m : blocks::named_ssm_mixers(model)) {
    auto own = m.module->named_parameters(false);
    s[m.name + ".warmup_delta_A_log"] = torch::randn(own.find("A_log")->sizes());
  }
  return s;
}

int64_t trainable_numel(CausalLM& model) {
  int64_t n = 0;
  for (auto& p : model.parameters())
    if (p.requires_grad()) n += p.numel();
  return n;
}

ModelBatch batch(uint64_t seed) {
  torch::manual_seed(seed);
  ModelBatch b;
  b.input_ids = torch::randint(0, 64, {2, 10}, torch::kLong);
  b.labels = b.input_ids;
  return b;
}

}  // namespace

TEST(SdtPlugin, PlanCountsAreTheBudgetsArithmeticAndEqualApply) {
  {
    auto model = build(kMamba, 1);
    auto req = sdt_request({"out_proj"});
    req.spec.state = random_state(*model, 2);
    auto plan = plan_adapters(model->inventory(), req);
    // Per layer: channels 32 - round(0.75 x 32) = 8; states 8 - round(0.5 x 8) = 4 per channel;
    // A_log 8 x 4 = 32; B and C 8 states x 8 channels = 64 each; LoRA r=2 on out_proj (32 -> 16): 96.
    EXPECT_EQ(plan.count.trainable, 2 * (32 + 64 + 64 + 96));
    apply_adapters(*model, req, plan);
    EXPECT_EQ(trainable_numel(*model), plan.count.trainable);
    EXPECT_NE(plan.report.find("SDT"), std::string::npos) << plan.report;
  }
  {
    auto model = build(kGranite, 1);
    auto req = sdt_request({"out_proj", "o_proj"});
    req.spec.state = random_state(*model, 3);
    auto plan = plan_adapters(model->inventory(), req);
    // One Mamba-2 layer: heads 4 - round(0.75 x 4) = 1, each with A_log, D and dt_bias: 3; LoRA r=2
    // on out_proj (32 -> 32) and o_proj (32 -> 32): 128 each.
    EXPECT_EQ(plan.count.trainable, 3 + 128 + 128);
    apply_adapters(*model, req, plan);
    EXPECT_EQ(trainable_numel(*model), plan.count.trainable);
  }
  // A budget that leaves nothing to train is refused by plan, before any warm-up.
  auto model = build(kGranite, 1);
  auto req = sdt_request({"out_proj", "o_proj"}, {{"sdt.channel_freeze", 0.99}});
  EXPECT_THROW(plan_adapters(model->inventory(), req), InputError);
}

TEST(SdtPlugin, MaskedEntriesReceiveExactlyZeroUpdateOver20Steps) {
  auto model = build(kMamba, 4);
  auto req = sdt_request({"out_proj"}, {{"sdt.channel_zero", 0.125}});
  req.spec.state = random_state(*model, 5);
  std::map<std::string, torch::Tensor> base;
  for (auto& p : model->named_parameters()) base[p.key()] = p.value().detach().clone();
  apply_adapters(*model, req, plan_adapters(model->inventory(), req));
  std::vector<torch::Tensor> trained;
  for (auto& p : model->parameters())
    if (p.requires_grad()) trained.push_back(p);
  torch::optim::AdamW opt(trained, torch::optim::AdamWOptions(1e-2).weight_decay(0.1));
  for (int step = 0; step < 20; ++step) {
    opt.zero_grad();
    model->forward(batch(100 + step)).loss.backward();
    opt.step();
  }
  torch::NoGradGuard ng;
  std::map<std::string, std::shared_ptr<nn::LinearImpl>> linears;
  for (auto& [name, lin] : nn::named_linears(*model)) linears[name] = lin;
  const int64_t N = 8, R = 2;
  for (const auto& m : blocks::named_ssm_mixers(*model)) {
    SCOPED_TRACE(m.name);
    const auto sel = sdt::select(req.spec.state.at(m.name + ".warmup_delta_A_log"), sdt::Budget{0.75, 0.125},
                                 sdt::Budget{0.5, int64_t{0}});
    ASSERT_EQ(sel.num_channels(), 4);  // 32 - 24 frozen - 4 zeroed
    auto own = m.module->named_parameters(false);
    const auto a0 = base.at(m.name + ".A_log");
    auto a = m.mixer->parameter_adapter()->effective("A_log", *own.find("A_log"));
    // Zeroed channels hold 10; selected entries moved; every other entry is exactly the base.
    EXPECT_TRUE(torch::equal(a.masked_select(sel.a_zero_mask), torch::full({4 * N}, 10.0)));
    auto moved = (a != a0).logical_and(sel.a_zero_mask.logical_not());
    EXPECT_TRUE(torch::equal(moved, sel.a_mask));
    // x_proj: only the B and C rows of the selected channels' columns moved.
    auto& xp = *linears.at(m.name + ".x_proj");
    auto w = xp.adapter()->merged_weight(xp);
    auto changed = w != base.at(m.name + ".x_proj.weight");
    auto want = torch::zeros_like(changed);
    want.narrow(0, R, N).copy_(sel.bc_mask);
    want.narrow(0, R + N, N).copy_(sel.bc_mask);
    EXPECT_TRUE(torch::equal(changed, want));
  }
  // The base weights themselves never changed.
  for (auto& p : model->named_parameters())
    if (base.count(p.key())) EXPECT_TRUE(torch::equal(p.value(), base.at(p.key()))) << p.key();
}

TEST(SdtPlugin, WarmupSelectionSaveLoadMergeAndInitFrom) {
  auto plugin = PluginRegistry::instance().adapter_for_method("sdt");
  for (const auto* config : {&kMamba, &kGranite}) {
    SCOPED_TRACE((*config)["model_type"].get<std::string>());
    const std::vector<std::string> targets = *config == kMamba ? std::vector<std::string>{"out_proj"}
                                                               : std::vector<std::string>{"out_proj", "o_proj"};
    // Warm-up: a dense trained delta of A_log per mixer; end_warmup keeps it.
    auto warm = build(*config, 6);
    auto req = sdt_request(targets);
    EXPECT_EQ(plugin->warmup_steps(req.spec), 2);
    auto warm_applied = apply_adapters(*warm, req, plan_adapters(warm->inventory(), req));
    auto expected_state = random_state(*warm, 7);
    {
      torch::NoGradGuard ng;
      auto params = warm->named_parameters();
      for (const auto& [key, t] : expected_state) {
        const auto mixer = key.substr(0, key.rfind('.'));
        params[mixer + ".sdt_warmup_A_log"].copy_(t);
      }
    }
    auto state = plugin->end_warmup(*warm, req.spec);
    ASSERT_EQ(state.size(), expected_state.size());
    for (const auto& [key, t] : expected_state) EXPECT_TRUE(torch::equal(state.at(key), t)) << key;

    // The real phase starts from the base with that state; train it a little.
    auto model = build(*config, 6);
    req.spec.state = state;
    EXPECT_EQ(plugin->warmup_steps(req.spec), 0);
    auto applied = apply_adapters(*model, req, plan_adapters(model->inventory(), req));
    std::vector<torch::Tensor> trained;
    for (auto& p : model->parameters())
      if (p.requires_grad()) trained.push_back(p);
    torch::optim::AdamW opt(trained, torch::optim::AdamWOptions(2e-2));
    for (int step = 0; step < 5; ++step) {
      opt.zero_grad();
      model->forward(batch(200 + step)).loss.backward();
      opt.step();
    }
    const auto b = batch(300);
    model->eval();
    auto logits = model->forward(b).logits.detach();

    // peft: saved (dense deltas + LoRA + the warm-up state) and loaded into a fresh base.
    const auto dir = fs::temp_directory_path() / ("peftfw_sdt_" + std::to_string(::getpid()));
    fs::remove_all(dir);
    SaveRequest save;
    save.model = model.get();
    save.adapter = &req.spec;
    save.adapted_modules = applied.adapted_modules;
    save.method_tensors = plugin->saved_tensors(*model, req.spec, applied);
    save.method_state = req.spec.state;
    save.config_json = config->dump();
    PluginRegistry::instance().persistence("peft")->save(save, dir);
    auto fresh = build(*config, 6);
    auto loaded = PluginRegistry::instance().persistence("peft")->load(*fresh, dir);
    EXPECT_EQ(loaded.method, "sdt");
    fresh->eval();
    EXPECT_TRUE(torch::allclose(fresh->forward(b).logits.detach(), logits, 1e-5, 1e-5));

    // merged: the folded base alone gives the same logits.
    auto folded = merged_state_dict(*model);
    auto plain = build(*config, 6);
    {
      torch::NoGradGuard ng;
      for (auto& p : plain->named_parameters()) p.value().copy_(folded.at(p.key()));
    }
    plain->eval();
    EXPECT_TRUE(torch::allclose(plain->forward(b).logits.detach(), logits, 1e-5, 1e-5));

    // init_from: the stored dense deltas give back the trained vectors.
    auto back = plugin->trained_from_saved(req.spec, save.method_tensors);
    auto params = model->named_parameters();
    int sdt_tensors = 0;
    for (const auto& name : applied.added_tensors) {
      if (name.find(".sdt_") == std::string::npos) continue;
      ++sdt_tensors;
      ASSERT_TRUE(back.count(name)) << name;
      EXPECT_TRUE(torch::allclose(back.at(name), params[name], 1e-6, 1e-7)) << name;
    }
    EXPECT_GT(sdt_tensors, 0);
    fs::remove_all(dir);
  }
}
