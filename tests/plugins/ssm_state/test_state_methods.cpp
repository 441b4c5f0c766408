// The state methods (plugins state_offset and initial_state) on a Mamba-1 model and a Mamba-2 hybrid:
// what plan counts and names is what apply creates, they start from the pretrained model (zero
// init), they train, the peft format saves and reloads them exactly, and merged refuses them.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "peftfw/adapters/setup.hpp"
#include "peftfw/error.hpp"
#include "peftfw/io/json_config.hpp"
#include "peftfw/model/causal_lm.hpp"
#include "peftfw/plugin/architecture.hpp"
#include "peftfw/plugin/persistence.hpp"
#include "peftfw/plugin/registry.hpp"
#include "../../common/tiny_model.hpp"

using namespace peftfw;
namespace fs = std::filesystem;

namespace {

struct Family {
  const char* name;
  nlohmann::json config;
};

std::vector<Family> families() {
  return {
      {"mamba", {{"model_type", "mamba"}, {"vocab_size", 64}, {"hidden_size", 16}, {"num_hidden_layers", 2},
                 {"state_size", 4}, {"expand", 2}, {"conv_kernel", 4}, {"time_step_rank", 2}}},
      {"granitemoehybrid",
       {{"model_type", "granitemoehybrid"}, {"vocab_size", 64}, {"hidden_size", 32}, {"num_hidden_layers", 2},
        {"layer_types", {"mamba", "attention"}}, {"num_attention_heads", 2}, {"num_key_value_heads", 1},
        {"shared_intermediate_size", 48}, {"num_local_experts", 0}, {"mamba_n_heads", 4}, {"mamba_d_head", 8},
        {"mamba_n_groups", 2}, {"mamba_d_state", 4}, {"mamba_expand", 1}, {"mamba_chunk_size", 4}, {"tie_word_embeddings", true}}},
  };
}

std::shared_ptr<CausalLM> build(const Family& f, uint64_t seed) { return peftfw::testing::tiny_random_model(f.config, seed); }

struct Method {
  const char* method;
  std::map<std::string, recipe::Value> options;
};

std::vector<Method> methods() {
  return {{"state_offset", {{"state_offset.readout", std::string("state")}}},
          {"state_offset", {{"state_offset.readout", std::string("output")}}},
          {"initial_state", {}},
          {"initial_state", {{"initial_state.conv_window", true}}}};
}

ModelBatch batch() {
  torch::manual_seed(11);
  ModelBatch b;
  b.input_ids = torch::randint(0, 64, {2, 9}, torch::kLong);
  b.labels = b.input_ids;
  return b;
}

std::string describe(const Family& f, const Method& m) {
  std::string s = std::string(f.name) + " / " + m.method;
  for (const auto& [k, v] : m.options) s += " " + k + "=" + recipe::toml_literal(v);
  return s;
}

}  // namespace

TEST(StateMethods, PlanNamesAndCountsWhatApplyCreates) {
  for (const auto& f : families())
    for (const auto& m : methods()) {
      SCOPED_TRACE(describe(f, m));
      auto model = build(f, 1);
      AdapterRequest req;
      req.spec = adapter_spec(m.method, m.options);
      auto plan = plan_adapters(model->inventory(), req);
      auto planned = PluginRegistry::instance().adapter_for_method(m.method)->added_tensors(req.spec, model->inventory());
      auto result = apply_adapters(*model, req, plan);
      auto params = model->named_parameters();
      int64_t trainable = 0, all = 0;
      for (const auto& p : params) {
        all += p.value().numel();
        if (p.value().requires_grad()) trainable += p.value().numel();
      }
      EXPECT_EQ(plan.count.trainable, trainable);
      EXPECT_EQ(plan.count.all, all);
      ASSERT_EQ(planned.size(), result.added_tensors.size());
      int64_t per_mixer = 0;
      for (size_t i = 0; i < planned.size(); ++i) {
        EXPECT_EQ(planned[i].name, result.added_tensors[i]);
        auto* p = params.find(planned[i].name);
        ASSERT_NE(p, nullptr) << planned[i].name;
        EXPECT_EQ(p->sizes().vec(), planned[i].shape) << planned[i].name;
        EXPECT_TRUE(p->requires_grad());
        per_mixer += p->numel();
      }
      // The arithmetic of the shapes: one mixer per SSM layer, each [state] (or [output]) + window.
      const bool mamba1 = std::string(f.name) == "mamba";
      const int64_t layers = mamba1 ? 2 : 1;
      const int64_t di = mamba1 ? 32 : 4 * 8, n = 4, conv = mamba1 ? 32 : 32 + 2 * 2 * 4;
      int64_t want = 0;
      if (std::string(m.method) == "state_offset")
        want = std::get<std::string>(m.options.at("state_offset.readout")) == "state" ? di * n : di;
      else
        want = di * n + (m.options.count("initial_state.conv_window") ? conv * 3 : 0);
      EXPECT_EQ(per_mixer, layers * want);
      EXPECT_EQ(plan.count.trainable, layers * want);
      EXPECT_NE(plan.report.find("trainable params: "), std::string::npos);
    }
}

TEST(StateMethods, StartFromThePretrainedModelTrainAndRoundTripThroughPeft) {
  for (const auto& f : families())
    for (const auto& m : methods()) {
      SCOPED_TRACE(describe(f, m));
      auto model = build(f, 2);
      const auto b = batch();
      for (auto& p : model->parameters()) p.set_requires_grad(false);  // as apply_adapters leaves the base
      auto before = model->forward(b).logits.detach();
      AdapterRequest req;
      req.spec = adapter_spec(m.method, m.options);
      auto plan = plan_adapters(model->inventory(), req);
      auto result = apply_adapters(*model, req, plan);
      // Zero-initialised: the adapted model is the pretrained one (exactly; to rounding with a conv
      // window, whose path applies SiLU after the conv instead of inside it).
      auto at_init = model->forward(b).logits.detach();
      if (m.options.count("initial_state.conv_window"))
        EXPECT_TRUE(torch::allclose(at_init, before, 0, 1e-6)) << (at_init - before).abs().max();
      else
        EXPECT_TRUE(torch::equal(at_init, before)) << (at_init - before).abs().max();
      // Every added tensor gets a gradient, and a few SGD steps lower the loss.
      std::vector<torch::Tensor> trained;
      for (auto& p : model->parameters())
        if (p.requires_grad()) trained.push_back(p);
      torch::optim::SGD sgd(trained, torch::optim::SGDOptions(0.5));
      double first = 0, last = 0;
      for (int step = 0; step < 5; ++step) {
        sgd.zero_grad();
        auto loss = model->forward(b).loss;
        loss.backward();
        if (step == 0) {
          first = loss.item<double>();
          for (auto& t : trained) EXPECT_GT(t.grad().abs().sum().item<double>(), 0);
        }
        last = loss.item<double>();
        sgd.step();
      }
      EXPECT_LT(last, first);
      auto after = model->forward(b).logits.detach();
      EXPECT_FALSE(torch::allclose(after, before));

      // peft format: saved and loaded into a fresh base, the logits are the trained model's.
      const auto dir = fs::temp_directory_path() / ("peftfw_state_methods_" + std::to_string(::getpid()));
      fs::remove_all(dir);
      SaveRequest save;
      save.model = model.get();
      save.adapter = &req.spec;
      save.adapted_modules = result.adapted_modules;
      save.method_tensors = PluginRegistry::instance().adapter_for_method(m.method)->saved_tensors(*model, req.spec, result);
      save.config_json = f.config.dump();
      PluginRegistry::instance().persistence("peft")->save(save, dir);
      EXPECT_TRUE(fs::exists(dir / "method_tensors.safetensors"));
      auto fresh = build(f, 2);
      auto loaded = PluginRegistry::instance().persistence("peft")->load(*fresh, dir);
      EXPECT_EQ(loaded.method, m.method);
      auto sorted = [](std::vector<std::string> v) {
        std::sort(v.begin(), v.end());
        return v;
      };
      EXPECT_EQ(sorted(loaded.added_tensors), sorted(result.added_tensors));
      EXPECT_TRUE(torch::allclose(fresh->forward(b).logits.detach(), after, 1e-6, 1e-6));

      // merged refuses, before training (check_method) and at save.
      const auto method = PluginRegistry::instance().adapter_method(m.method);
      EXPECT_THROW(PluginRegistry::instance().persistence("merged")->check_method(method), InputError);
      EXPECT_THROW(PluginRegistry::instance().persistence("merged")->save(save, dir / "merged"), InputError);
      EXPECT_FALSE(fs::exists(dir / "merged"));
      fs::remove_all(dir);
    }
}

TEST(StateMethods, TargetsAreRefusedForMethodsThatWrapNoModule) {
  auto model = build(families()[0], 3);
  AdapterRequest req;
  req.spec = adapter_spec("initial_state");
  recipe::TargetPattern p;
  p.names = {"in_proj"};
  req.targets.target_modules = p;
  try {
    plan_adapters(model->inventory(), req);
    FAIL() << "expected InputError";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("does not wrap modules"), std::string::npos) << e.what();
  }
}
