// Values peftfw refuses at load: NaN/Inf in base weights, integer tensors where
// float weights belong (io::to_float_tensor, io::count_non_finite, load_weights).
// Checkpoints are copies of the transformers oracle's dense_nope case with one
// tensor changed; expected counts come from the values written.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>

#include "../../common/expect_error.hpp"
#include "peftfw/error.hpp"
#include "peftfw/io/safetensors.hpp"
#include "peftfw/io/tensor_bridge.hpp"
#include "peftfw/model/causal_lm.hpp"
#include "peftfw/model/loader.hpp"

namespace fs = std::filesystem;
using namespace peftfw;
using peftfw::testing::expect_input_error;

namespace {

const float kNaN = std::numeric_limits<float>::quiet_NaN();
const float kInf = std::numeric_limits<float>::infinity();

fs::path oracle_case() { return fs::path(PEFTFW_GRANITE_ORACLE_DIR) / "dense_nope"; }

// A copy of dense_nope in a fresh folder, with `edit` applied to its tensors.
fs::path edited_copy(const std::string& name,
                     const std::function<void(std::map<std::string, torch::Tensor>&)>& edit) {
  const fs::path dir = fs::path(PEFTFW_TEST_BINARY_DIR) / "weight_checks" / name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  fs::copy_file(oracle_case() / "config.json", dir / "config.json");
  auto tensors = io::load_checkpoint_tensors((oracle_case() / "model.safetensors").string());
  edit(tensors);
  io::save_tensors((dir / "model.safetensors").string(), tensors, {{"format", "pt"}});
  return dir;
}

LoadedModel load_dir(const fs::path& dir) {
  ModelSource s;
  s.dir = dir;
  return load_model(s);
}

TEST(WeightChecks, CountNonFiniteCountsNaNAndBothInfinities) {
  auto t = torch::tensor({1.0f, kNaN, kInf, -kInf, 0.0f, kNaN});
  auto c = io::count_non_finite(t);
  EXPECT_EQ(c.nan, 2);
  EXPECT_EQ(c.inf, 2);
  EXPECT_EQ(c.numel, 6);
  EXPECT_TRUE(c.any());
  EXPECT_EQ(io::describe_non_finite(c), "2 NaN and 2 Inf among 6 values");
  EXPECT_FALSE(io::count_non_finite(torch::ones({3, 3}, torch::kBFloat16)).any());
  EXPECT_FALSE(io::count_non_finite(torch::tensor({int64_t{1}, int64_t{2}})).any());
  // bf16 keeps NaN: a checkpoint stored in 16 bits is checked the same way
  EXPECT_EQ(io::count_non_finite(t.to(torch::kBFloat16)).nan, 2);
}

TEST(WeightChecks, ToFloatTensorRefusesIntegersAndNonFinite) {
  const int64_t ints[3] = {1, 2, 3};
  io::TensorView iv{io::DType::I64, {3}, reinterpret_cast<const uint8_t*>(ints), sizeof(ints)};
  expect_input_error([&] { io::to_float_tensor(iv, "w.safetensors: tensor 'x'", "float32"); },
                     {"w.safetensors: tensor 'x'", "stored as I64", "float32"});
  const float vals[3] = {0.5f, kNaN, 2.0f};
  io::TensorView fv{io::DType::F32, {3}, reinterpret_cast<const uint8_t*>(vals), sizeof(vals)};
  expect_input_error([&] { io::to_float_tensor(fv, "w.safetensors: tensor 'y'", "float32"); },
                     {"w.safetensors: tensor 'y'", "1 NaN and 0 Inf among 3 values"});
  const float ok[2] = {0.5f, -2.0f};
  io::TensorView okv{io::DType::F32, {2}, reinterpret_cast<const uint8_t*>(ok), sizeof(ok)};
  auto t = io::to_float_tensor(okv, "ok", "float32");
  EXPECT_FLOAT_EQ(t[1].item<float>(), -2.0f);
}

TEST(WeightChecks, CleanCopyLoads) {
  // The control: the copy itself is loadable, so the refusals below are about the edit.
  const auto dir = edited_copy("clean", [](auto&) {});
  EXPECT_NO_THROW(load_dir(dir));
}

TEST(WeightChecks, NaNAndInfInBaseWeightsAreRefusedWithCounts) {
  const std::string name = "model.layers.0.mamba.in_proj.weight";
  int64_t numel = 0;
  const auto dir = edited_copy("nan", [&](auto& t) {
    auto w = t.at(name).clone();
    numel = w.numel();
    auto flat = w.view({-1});
    flat[3] = kNaN;
    flat[10] = kNaN;
    flat[11] = -kInf;
    t[name] = w;
  });
  expect_input_error([&] { load_dir(dir); },
                     {name, (dir / "model.safetensors").string(),
                      "2 NaN and 1 Inf among " + std::to_string(numel) + " values",
                      "tensors with non-finite values (NaN/Inf) (1)"});
}

TEST(WeightChecks, EveryNonFiniteTensorIsListed) {
  const std::string a = "model.embed_tokens.weight", b = "model.norm.weight";
  const auto dir = edited_copy("nan2", [&](auto& t) {
    t[a] = t.at(a).clone();
    t[a].view({-1})[0] = kInf;
    t[b] = t.at(b).clone();
    t[b].view({-1})[1] = kNaN;
  });
  expect_input_error([&] { load_dir(dir); },
                     {a + " (", b + " (", "0 NaN and 1 Inf among", "1 NaN and 0 Inf among",
                      "tensors with non-finite values (NaN/Inf) (2)"});
}

TEST(WeightChecks, IntegerTensorWhereFloatWeightBelongsIsRefused) {
  const std::string name = "model.layers.0.mamba.out_proj.weight";
  const auto dir =
      edited_copy("int64", [&](auto& t) { t[name] = t.at(name).mul(100).to(torch::kLong); });
  expect_input_error([&] { load_dir(dir); },
                     {name, (dir / "model.safetensors").string(), "stored as I64",
                      "expected a floating-point type", "float32 parameter"});
}

TEST(WeightChecks, Float16CheckpointStillLoads) {
  // Float types other than float32 are fine: only integers and non-finite values are refused.
  const auto dir = edited_copy("bf16", [](auto& t) {
    for (auto& [k, v] : t) v = v.to(torch::kBFloat16);
  });
  EXPECT_NO_THROW(load_dir(dir));
}

}  // namespace
