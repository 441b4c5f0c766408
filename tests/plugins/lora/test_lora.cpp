// Adapters on Granite: parameter counts on the real Granite-4.0-H-Micro config
// (expected values: HF PEFT's print_trainable_parameters in the seed study's
// logs), target errors, SSM float32 master copies, LoRA/DoRA algebra.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "peftfw/adapters/setup.hpp"
#include "peftfw/error.hpp"
#include "peftfw/io/json_config.hpp"
#include "peftfw/model/causal_lm.hpp"
#include "peftfw/nn/linear.hpp"
#include "peftfw/plugin/architecture.hpp"
#include "peftfw/plugin/registry.hpp"

using namespace peftfw;

namespace {

io::JsonConfig micro_config() {
  return io::JsonConfig::load(std::string(PEFTFW_TEST_ASSETS_DIR) + "/granite-4.0-h-micro/config.json");
}

ModelInventory micro_inventory() {
  return PluginRegistry::instance().architecture_for_model_type("granitemoehybrid")->describe(micro_config());
}

AdapterRequest request(std::vector<std::string> targets, const std::string& on_unmatched = "error",
                       std::vector<std::string> ssm = {}) {
  AdapterRequest r;
  r.spec = adapter_spec("lora", {{"r", std::int64_t{16}}, {"alpha", 32.0}, {"dropout", 0.0}});
  recipe::TargetPattern p;
  p.names = std::move(targets);
  r.targets.target_modules = p;
  r.targets.on_unmatched = on_unmatched;
  r.ssm_groups = std::move(ssm);
  return r;
}

const std::vector<std::string> kV1 = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
const std::vector<std::string> kV2 = {"q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "out_proj",
                                      "input_linear", "output_linear"};

TEST(GraniteAdapters, V1TargetsAdaptOnlyAttentionAndWarn) {
  auto plan = plan_adapters(micro_inventory(), request(kV1, "warn"));
  EXPECT_EQ(plan.modules.size(), 16u);  // 4 attention layers x q,k,v,o
  EXPECT_NE(plan.report.find("trainable params: 851,968 ||"), std::string::npos) << plan.report;
  EXPECT_FALSE(plan.warnings.empty());
}

TEST(GraniteAdapters, V1TargetsAreAnErrorByDefault) {
  try {
    plan_adapters(micro_inventory(), request(kV1));
    FAIL() << "expected InputError";
  } catch (const InputError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("gate_proj"), std::string::npos) << msg;
    EXPECT_NE(msg.find("no module of the 36 mamba layers is adapted"), std::string::npos) << msg;
  }
}

TEST(GraniteAdapters, V2AndV3ParameterCounts) {
  auto v2 = plan_adapters(micro_inventory(), request(kV2));
  EXPECT_EQ(v2.modules.size(), 168u);
  EXPECT_NE(v2.report.find("trainable params: 28,823,552 || all params: 3,220,219,648 || trainable%: 0.8951"),
            std::string::npos)
      << v2.report;
  auto v3 = plan_adapters(micro_inventory(), request(kV2, "error", {"A_log", "D", "dt_bias"}));
  EXPECT_EQ(v3.ssm_tensors.size(), 108u);
  EXPECT_NE(v3.report.find("trainable params: 28,830,464 ||"), std::string::npos) << v3.report;
  EXPECT_NE(v3.coverage.find("mamba"), std::string::npos);
}

TEST(GraniteAdapters, TargetMatchingNothingAndUnadaptableModules) {
  try {
    plan_adapters(micro_inventory(), request({"in_projj", "out_proj", "q_proj", "input_linear"}));
    FAIL();
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("in_projj"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("in_proj"), std::string::npos) << e.what();
  }
  try {
    plan_adapters(micro_inventory(), request({"conv1d", "in_proj", "q_proj"}, "ignore"));
    FAIL();
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("depthwise"), std::string::npos) << e.what();
  }
  try {
    plan_adapters(micro_inventory(), request(kV2, "error", {"B_log"}));
    FAIL();
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("A_log, D, dt_bias"), std::string::npos) << e.what();
  }
}

std::shared_ptr<CausalLM> tiny_model(const std::string& dtype) {
  nlohmann::json c = {{"model_type", "granitemoehybrid"}, {"vocab_size", 64}, {"hidden_size", 32},
                      {"num_hidden_layers", 2}, {"layer_types", {"mamba", "attention"}},
                      {"num_attention_heads", 2}, {"num_key_value_heads", 1},
                      {"shared_intermediate_size", 48}, {"num_local_experts", 0},
                      {"mamba_n_heads", 4}, {"mamba_d_head", 16}, {"mamba_d_state", 8},
                      {"mamba_chunk_size", 4}, {"tie_word_embeddings", true}};
  auto config = io::JsonConfig::parse(c.dump(), "tiny");
  BuildOptions o;
  o.dtype = dtype;
  return PluginRegistry::instance().architecture_for_model_type("granitemoehybrid")->build(config, o);
}

TEST(GraniteAdapters, SsmTensorsAreFloat32MastersInABf16Model) {
  auto model = tiny_model("bfloat16");
  auto req = request({"in_proj", "q_proj", "k_proj", "v_proj", "o_proj"}, "error", {"dt_bias"});
  auto plan = plan_adapters(model->inventory(), req);
  apply_adapters(*model, req, plan);
  auto params = model->named_parameters();  // find() points into this dict: keep it alive
  auto* dt_bias = params.find("model.layers.0.mamba.dt_bias");
  ASSERT_NE(dt_bias, nullptr);
  EXPECT_EQ(dt_bias->scalar_type(), torch::kFloat32);
  EXPECT_TRUE(dt_bias->requires_grad());
  {
    torch::NoGradGuard ng;
    dt_bias->fill_(-4.0);
  }
  // One SGD step of 2e-4: bf16 (spacing 2^-5 = 0.03125 at |x| = 4) would round it away.
  torch::optim::SGD sgd({*dt_bias}, torch::optim::SGDOptions(2e-4));
  dt_bias->mutable_grad() = -torch::ones_like(*dt_bias);
  sgd.step();
  EXPECT_NEAR(dt_bias->index({0}).item<double>(), -4.0 + 2e-4, 1e-6);
  EXPECT_EQ((torch::full({1}, -4.0, torch::kBFloat16) + 2e-4).item<double>(), -4.0);
  // The bf16 model still runs with the float32 master copies.
  ModelBatch b;
  b.input_ids = torch::randint(0, 64, {1, 6}, torch::kLong);
  b.labels = b.input_ids;
  auto out = model->forward(b);
  out.loss.backward();
  EXPECT_TRUE(dt_bias->grad().defined());
}

// The plugin's count (what `plan` reports and the memory preflight uses, from the inventory
// alone) equals what apply() makes trainable, for every method it provides.
TEST(LoraPlugin, PlannedCountEqualsTheAppliedModel) {
  for (const std::string method : {"lora", "dora", "bitfit", "full"}) {
    auto model = tiny_model("float32");
    const bool wraps = std::string(method) == "lora" || std::string(method) == "dora";
    auto req = request(wraps ? std::vector<std::string>{"in_proj", "out_proj", "q_proj", "o_proj"}
                             : std::vector<std::string>{},  // bitfit / full wrap no module: no targets
                       "error", {"A_log", "D", "dt_bias"});
    if (!wraps) req.targets.target_modules.reset();
    req.spec = adapter_spec(method, {{"r", std::int64_t{4}}, {"alpha", 8.0}});
    auto plan = plan_adapters(model->inventory(), req);
    apply_adapters(*model, req, plan);
    int64_t trainable = 0, all = 0;
    for (const auto& p : model->named_parameters()) {
      all += p.value().numel();
      if (p.value().requires_grad()) trainable += p.value().numel();
    }
    EXPECT_EQ(plan.count.trainable, trainable) << method;
    EXPECT_EQ(plan.count.all, all) << method;
    EXPECT_NE(plan.report.find("trainable params: "), std::string::npos) << method;
  }
  EXPECT_THROW(adapter_spec("lora", {{"rank", std::int64_t{4}}}), InputError);
  EXPECT_THROW(adapter_spec("lora", {{"r", 4.5}}), InputError);
}

TEST(GraniteAdapters, LoraForwardEqualsMergedWeightAndStartsAtIdentity) {
  for (const std::string method : {"lora", "dora"}) {
    auto model = tiny_model("float32");
    ModelBatch b;
    b.input_ids = torch::randint(0, 64, {2, 5}, torch::kLong);
    torch::NoGradGuard ng;
    auto before = model->forward(b).logits;
    auto req = request({"in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj"});
    req.spec = adapter_spec(method, {{"r", std::int64_t{16}}, {"alpha", 32.0}, {"dropout", 0.0}});
    auto plan = plan_adapters(model->inventory(), req);
    apply_adapters(*model, req, plan);
    // B = 0 at init (and DoRA's magnitude = ||W||): the adapted model equals the base.
    EXPECT_LE((model->forward(b).logits - before).abs().max().item<double>(), 1e-5) << method;
    for (auto& [name, lin] : nn::named_linears(*model)) {
      if (!lin->adapter()) continue;
      lin->named_parameters()["lora_B.weight"].normal_(0.0, 0.1);
      auto x = torch::randn({3, lin->in_features()});
      auto y = lin->forward(x);
      auto merged = torch::nn::functional::linear(x, lin->adapter()->merged_weight(*lin), lin->bias);
      EXPECT_LE((y - merged).abs().max().item<double>(), 1e-5) << method << " " << name;
    }
  }
}

// A bf16 model does the adapter math in bf16, adding h B^T into the base output in place.
// Output and the gradients of x, lora_A and lora_B against float32 autograd through the merged
// weight W + (alpha / r) B A.
// A bf16 LoRA layer's output and gradients (y, gx, gA, gB) against the float32 oracle's
// (yf, xf.grad(), A.grad(), B.grad()), relative to the oracle's largest entry; clears the
// oracle's A and B gradients for the next layer.
void expect_bf16_near_oracle(const std::string& name, const torch::Tensor& y, const torch::Tensor& gx,
                             const torch::Tensor& gA, const torch::Tensor& gB, const torch::Tensor& yf,
                             const torch::Tensor& xf, torch::Tensor& A, torch::Tensor& B) {
  auto rel = [](const torch::Tensor& a, const torch::Tensor& b) {
    return (a - b).abs().max().item<double>() / b.abs().max().item<double>();
  };
  EXPECT_LE(rel(y.to(torch::kFloat32), yf), 2e-2) << name;
  EXPECT_LE(rel(gx, xf.grad()), 2e-2) << name;
  EXPECT_LE(rel(gA, A.grad()), 3e-2) << name;
  EXPECT_LE(rel(gB, B.grad()), 3e-2) << name;
  A.mutable_grad() = torch::Tensor();
  B.mutable_grad() = torch::Tensor();
}

TEST(GraniteAdapters, Bf16LoraForwardAndGradientsMatchFloat32) {
  auto model = tiny_model("bfloat16");
  auto req = request({"in_proj", "out_proj", "q_proj", "o_proj"});
  auto plan = plan_adapters(model->inventory(), req);
  apply_adapters(*model, req, plan);
  model->eval();  // no dropout
  torch::manual_seed(4);
  int checked = 0;
  for (auto& [name, lin] : nn::named_linears(*model)) {
    if (!lin->adapter()) continue;
    auto params = lin->named_parameters();
    auto A = params["lora_A.weight"], B = params["lora_B.weight"];
    { torch::NoGradGuard ng; B.normal_(0.0, 0.1); }
    auto x = torch::randn({2, 3, lin->in_features()}).to(torch::kBFloat16).requires_grad_(true);
    auto wy = torch::randn({2, 3, lin->out_features()});
    auto y = lin->forward(x);
    ASSERT_EQ(y.scalar_type(), torch::kBFloat16) << name;
    (y.to(torch::kFloat32) * wy).sum().backward();
    auto gx = x.grad().to(torch::kFloat32), gA = A.grad().clone(), gB = B.grad().clone();
    A.mutable_grad() = torch::Tensor();
    B.mutable_grad() = torch::Tensor();

    auto xf = x.detach().to(torch::kFloat32).requires_grad_(true);
    auto bias = lin->bias.defined() ? lin->bias.to(torch::kFloat32) : torch::Tensor();
    const double scaling = req.spec.real("alpha") / static_cast<double>(req.spec.integer("r"));
    auto merged = lin->weight.to(torch::kFloat32) + scaling * torch::matmul(B, A);
    auto yf = torch::nn::functional::linear(xf, merged, bias);
    (yf * wy).sum().backward();
    expect_bf16_near_oracle(name, y, gx, gA, gB, yf, xf, A, B);
    ++checked;
  }
  EXPECT_GE(checked, 4);
}

// Training mode with dropout: the fused 16-bit LoRA node draws its mask with
// at::native_dropout on the [tokens, in] input, so the same seed and shape reproduce it
// here; the float32 oracle is x W^T + b + s ((x * mask / (1 - p)) A^T) B^T.
TEST(GraniteAdapters, Bf16LoraWithDropoutMatchesFloat32Oracle) {
  auto model = tiny_model("bfloat16");
  auto req = request({"in_proj", "out_proj", "o_proj", "input_linear"});
  req.spec.options["dropout"] = 0.3;
  auto plan = plan_adapters(model->inventory(), req);
  apply_adapters(*model, req, plan);
  model->train();
  int checked = 0;
  for (auto& [name, lin] : nn::named_linears(*model)) {
    if (!lin->adapter()) continue;
    auto params = lin->named_parameters();
    auto A = params["lora_A.weight"], B = params["lora_B.weight"];
    { torch::NoGradGuard ng; B.normal_(0.0, 0.1); }
    const int64_t K = lin->in_features();
    auto x = torch::randn({2, 5, K}).to(torch::kBFloat16).requires_grad_(true);
    auto wy = torch::randn({2, 5, lin->out_features()});
    torch::manual_seed(11);
    auto y = lin->forward(x);
    (y.to(torch::kFloat32) * wy).sum().backward();
    auto gx = x.grad().to(torch::kFloat32), gA = A.grad().clone(), gB = B.grad().clone();
    A.mutable_grad() = torch::Tensor();
    B.mutable_grad() = torch::Tensor();

    torch::manual_seed(11);
    auto keep = std::get<0>(at::native_dropout(torch::ones({10, K}, torch::kBFloat16), 0.3, true))
                    .to(torch::kFloat32)
                    .view({2, 5, K});  // mask / (1 - p)
    ASSERT_GT(keep.eq(0).sum().item<int64_t>(), 0) << "the mask drops something";
    auto xf = x.detach().to(torch::kFloat32).requires_grad_(true);
    const double scaling = req.spec.real("alpha") / static_cast<double>(req.spec.integer("r"));
    auto bias = lin->bias.defined() ? lin->bias.to(torch::kFloat32) : torch::Tensor();
    auto yf = torch::nn::functional::linear(xf, lin->weight.to(torch::kFloat32), bias) +
              scaling * torch::matmul(torch::matmul(xf * keep, A.t()), B.t());
    (yf * wy).sum().backward();
    expect_bf16_near_oracle(name, y, gx, gA, gB, yf, xf, A, B);
    ++checked;
  }
  EXPECT_GE(checked, 4);
}

}  // namespace
