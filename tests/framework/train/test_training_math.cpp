// Training-engine pieces checked against arithmetic: learning-rate schedules
// (transformers' formulas) and packed-vs-padded loss through a real model.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <map>
#include <nlohmann/json.hpp>

#include "peftfw/adapters/setup.hpp"
#include "peftfw/data/batching.hpp"
#include "peftfw/io/json_config.hpp"
#include "peftfw/model/causal_lm.hpp"
#include "peftfw/nn/checkpoint.hpp"
#include "peftfw/plugin/architecture.hpp"
#include "peftfw/plugin/registry.hpp"
#include "peftfw/train/schedule.hpp"

using namespace peftfw;

namespace {

TEST(Schedule, MatchesTransformersFormulas) {
  // The seed study: 339 steps, warmup_ratio 0.06 -> ceil(20.34) = 21 warmup steps.
  EXPECT_EQ(train::warmup_steps_for(339, 0.06, 0), 21);
  EXPECT_EQ(train::warmup_steps_for(339, 0.06, 5), 5);
  EXPECT_DOUBLE_EQ(train::lr_factor("cosine", 0, 339, 21), 0.0);
  EXPECT_DOUBLE_EQ(train::lr_factor("cosine", 10, 339, 21), 10.0 / 21.0);
  EXPECT_DOUBLE_EQ(train::lr_factor("cosine", 21, 339, 21), 1.0);
  EXPECT_NEAR(train::lr_factor("cosine", 21 + 159, 339, 21), 0.5, 1e-12);  // half way: cos(pi/2)
  EXPECT_NEAR(train::lr_factor("cosine", 339, 339, 21), 0.0, 1e-12);
  EXPECT_DOUBLE_EQ(train::lr_factor("linear", 100, 120, 20), 0.2);
  EXPECT_DOUBLE_EQ(train::lr_factor("constant", 100, 120, 20), 1.0);
}

std::shared_ptr<CausalLM> tiny_model(const std::string& dtype = "float32", int64_t intermediate = 48) {
  nlohmann::json c = {{"model_type", "granitemoehybrid"}, {"vocab_size", 300}, {"hidden_size", 32},
                      {"num_hidden_layers", 3}, {"layer_types", {"mamba", "attention", "mamba"}},
                      {"num_attention_heads", 2}, {"num_key_value_heads", 1},
                      {"shared_intermediate_size", intermediate}, {"num_local_experts", 0},
                      {"mamba_n_heads", 4}, {"mamba_d_head", 16}, {"mamba_d_state", 8},
                      {"mamba_chunk_size", 4}, {"tie_word_embeddings", true},
                      {"embedding_multiplier", 12.0}, {"residual_multiplier", 0.5}};
  BuildOptions o;
  o.seed = 3;
  o.dtype = dtype;
  auto m = PluginRegistry::instance().architecture_for_model_type("granitemoehybrid")->build(
      io::JsonConfig::parse(c.dump(), "tiny"), o);
  m->eval();
  return m;
}

ModelBatch to_batch(const data::Batch& b) {
  auto t = [&](const std::vector<int64_t>& v) { return torch::tensor(v, torch::kLong).view({b.rows, b.cols}); };
  ModelBatch m;
  m.input_ids = t(b.input_ids);
  m.attention_mask = t(b.attention_mask);
  m.labels = t(b.labels);
  if (!b.seq_ids.empty()) m.seq_ids = t(b.seq_ids);
  return m;
}

TEST(Packing, PackedLossEqualsPaddedLossOverTheSameExamples) {
  auto model = tiny_model();
  torch::NoGradGuard ng;
  torch::manual_seed(9);
  std::vector<data::TokenizedExample> ex;
  for (int64_t len : {5, 11, 3, 9, 7}) {
    data::TokenizedExample e;
    for (int64_t i = 0; i < len; ++i) e.ids.push_back(torch::randint(0, 256, {1}).item<int64_t>());
    e.labels = e.ids;
    e.labels[0] = data::kIgnoreIndex;  // as the tokenizer pipeline does
    ex.push_back(e);
  }
  const std::vector<int64_t> all = {0, 1, 2, 3, 4};
  auto padded = data::pad_batch(ex, all, 256);
  auto packed = data::pack_batch(ex, all, 20, 256);
  ASSERT_LT(packed.rows, padded.rows);  // several examples share a row
  const double lp = model->forward(to_batch(padded)).loss.item<double>();
  const double lk = model->forward(to_batch(packed)).loss.item<double>();
  EXPECT_NEAR(lk, lp, 1e-5 * std::abs(lp));
  // Without sequence ids the packed examples would see each other (the study's leak).
  auto leaky = to_batch(packed);
  leaky.seq_ids = torch::Tensor();
  EXPECT_GT(std::abs(model->forward(leaky).loss.item<double>() - lp), 1e-4);
}

// The tiny model in training mode with LoRA (r 4, alpha 8, dropout 0.2: the rerun in backward
// must draw the same masks) on `targets` and the SSM tensors, and a non-zero B so that every
// LoRA tensor gets a gradient.
std::shared_ptr<CausalLM> adapted_tiny_model(const std::vector<std::string>& targets,
                                             const std::string& dtype = "float32", int64_t intermediate = 48) {
  auto model = tiny_model(dtype, intermediate);
  model->train();
  AdapterRequest req;
  req.spec = adapter_spec("lora", {{"r", std::int64_t{4}}, {"alpha", 8.0}, {"dropout", 0.2}});
  recipe::TargetPattern p;
  p.names = targets;
  req.targets.target_modules = p;
  req.ssm_groups = {"A_log", "D", "dt_bias"};
  auto plan = plan_adapters(model->inventory(), req);
  apply_adapters(*model, req, plan);
  torch::NoGradGuard ng;
  for (auto& q : model->named_parameters())
    if (q.key().find("lora_B") != std::string::npos) q.value().normal_(0.0, 0.1);
  return model;
}

struct StepResult {
  double loss;
  std::map<std::string, torch::Tensor> grads;  // every trainable tensor's, float32
};

// One forward+backward on a fixed batch.
StepResult loss_and_grads(CausalLM& model) {
  for (auto& q : model.parameters()) q.mutable_grad() = torch::Tensor();  // a fresh step
  torch::manual_seed(21);
  ModelBatch b;
  b.input_ids = torch::randint(0, 256, {2, 13}, torch::kLong);
  b.labels = b.input_ids;
  auto out = model.forward(b);
  out.loss.backward();
  StepResult r{out.loss.item<double>(), {}};
  for (auto& q : model.named_parameters())
    if (q.value().requires_grad()) r.grads[q.key()] = q.value().grad().to(torch::kFloat32).clone();
  return r;
}

void expect_same_step(const StepResult& got, const StepResult& want) {
  EXPECT_NEAR(got.loss, want.loss, 1e-6 * std::abs(want.loss));
  ASSERT_EQ(got.grads.size(), want.grads.size());
  for (const auto& [name, g0] : want.grads) {
    const auto& g1 = got.grads.at(name);
    EXPECT_LE((g1 - g0).abs().max().item<double>(), 1e-5 * std::max(1e-12, g0.abs().max().item<double>()))
        << name;
  }
}

TEST(Checkpointing, SameLossAndGradientsAsWithout) {
  const std::vector<std::string> all = {"in_proj", "out_proj", "q_proj", "k_proj",
                                        "v_proj", "o_proj", "input_linear", "output_linear"};
  auto plain = adapted_tiny_model(all);
  const auto want = loss_and_grads(*plain);
  auto model = adapted_tiny_model(all);
  ASSERT_TRUE(model->set_gradient_checkpointing(true));
  expect_same_step(loss_and_grads(*model), want);
}

// Selective recomputation in a bf16 model: the projections with out <= in / 2 keep their
// outputs from the first run and the rerun takes them back: out_proj (64 -> 32) and the
// attention layer's k_proj and v_proj (32 -> 16, one KV head), without adapters, and every
// output_linear (128 -> 32, through the fused LoRA node). Loss and gradients are those of
// the run without checkpointing.
TEST(Checkpointing, KeptNarrowProjectionsGiveSameLossAndGradients) {
  const std::vector<std::string> targets = {"in_proj", "q_proj", "input_linear", "output_linear"};
  auto plain = adapted_tiny_model(targets, "bfloat16", 128);
  const auto before_plain = nn::keep_stats();
  const auto want = loss_and_grads(*plain);
  EXPECT_EQ(nn::keep_stats().kept, before_plain.kept) << "nothing is kept without checkpointing";

  auto model = adapted_tiny_model(targets, "bfloat16", 128);
  ASSERT_TRUE(model->set_gradient_checkpointing(true));
  nn::set_keep_policy(nn::KeepPolicy::kNarrowProjections);
  const auto before = nn::keep_stats();
  const auto got = loss_and_grads(*model);
  const auto after = nn::keep_stats();
  nn::set_keep_policy(nn::KeepPolicy::kNone);
  // 2 Mamba layers x out_proj + k_proj + v_proj + 3 layers x output_linear = 7.
  EXPECT_EQ(after.kept - before.kept, 7);
  EXPECT_EQ(after.taken - before.taken, 7);
  EXPECT_EQ(got.loss, want.loss);
  expect_same_step(got, want);
}

// With a budget for the other projections' outputs, first come first kept: with room for
// all, in_proj (2, wide, through the K-concatenated LoRA GEMM), q_proj (square, LoRA), o_proj
// (square, no adapter) and input_linear (3) are kept too, 7 + 7; with room for none, only the
// 7 narrow ones. In between: the batch is 2 x 13 tokens and the model bf16 with hidden size 32,
// so q_proj's and o_proj's outputs (the one attention layer's) take 2 * 13 * 32 * 2 = 1,664
// bytes each, and every other wide output is larger than two of them (in_proj
// 2 * 13 * (2 * 64 + 2 * 8 + 4) * 2 bytes with one group of state 8, input_linear
// 2 * 13 * 256 * 2), so it never fits: room for exactly both keeps 7 + 2, one byte less only
// q_proj's, 7 + 1. Every way loss and gradients are those of the run without checkpointing,
// and the budget is free again after the backward (a second step keeps as many).
TEST(Checkpointing, KeptWideProjectionsWithinTheBudget) {
  const std::vector<std::string> targets = {"in_proj", "q_proj", "input_linear", "output_linear"};
  auto plain = adapted_tiny_model(targets, "bfloat16", 128);
  const auto want = loss_and_grads(*plain);
  auto model = adapted_tiny_model(targets, "bfloat16", 128);
  ASSERT_TRUE(model->set_gradient_checkpointing(true));
  nn::set_keep_policy(nn::KeepPolicy::kNarrowProjections);
  const int64_t square = 2 * 13 * 32 * 2;
  const std::vector<std::pair<int64_t, int64_t>> budgets = {
      {int64_t{1} << 30, 14}, {2 * square, 9}, {2 * square - 1, 8}, {1, 7}};
  for (const auto& [budget, kept] : budgets) {
    nn::set_wide_keep_budget(budget);
    for (int step = 0; step < 2; ++step) {
      const auto before = nn::keep_stats();
      const auto got = loss_and_grads(*model);
      const auto after = nn::keep_stats();
      EXPECT_EQ(after.kept - before.kept, kept) << "budget " << budget << " step " << step;
      EXPECT_EQ(after.taken - before.taken, kept) << "budget " << budget << " step " << step;
      EXPECT_EQ(got.loss, want.loss);
      expect_same_step(got, want);
    }
  }
  nn::set_wide_keep_budget(0);
  nn::set_keep_policy(nn::KeepPolicy::kNone);
}

// A rerun whose op computes another shape than the output kept for it in the first run is an
// error that names both, not a silently wrong activation.
TEST(Checkpointing, KeptOutputOfAnotherShapeIsAnError) {
  int runs = 0;
  auto fn = [&runs](const torch::Tensor& x) {
    const int64_t cols = runs++ == 0 ? 3 : 4;  // the rerun takes another path
    if (auto kept = nn::take_kept_output(x.size(0), cols); kept.defined()) return kept;
    auto out = x.narrow(1, 0, cols) * 2;
    nn::keep_output(out);
    return out;
  };
  auto x = torch::randn({2, 5}).requires_grad_(true);
  auto y = nn::checkpoint(fn, x);
  EXPECT_EQ(runs, 1);
  try {
    y.sum().backward();
    FAIL() << "the rerun took a kept output of the wrong shape";
  } catch (const c10::Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("kept output 0 has shape [2, 3]"), std::string::npos) << what;
    EXPECT_NE(what.find("2 rows of 4"), std::string::npos) << what;
  }
}

}  // namespace
