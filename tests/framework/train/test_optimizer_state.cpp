// AdamW state saved without pickle (optimizer.safetensors + optimizer.json), and the legacy
// optimizer.pt still read: an optimizer restored either way continues exactly as the one
// that was never saved; damaged files are named.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <fstream>
#include <sstream>

#include "../../common/expect_error.hpp"
#include "peftfw/io/fs.hpp"
#include "peftfw/train/optimizer_state.hpp"

using namespace peftfw;
namespace fs = std::filesystem;

namespace {

struct Setup {
  train::NamedParameters params;
  std::unique_ptr<torch::optim::AdamW> opt;
};

Setup make(uint64_t seed) {
  torch::manual_seed(seed);
  Setup s;
  s.params = {{"a.lora_A", torch::randn({4, 3}).requires_grad_()}, {"b.A_log", torch::randn({5}).requires_grad_()}};
  std::vector<torch::Tensor> ps;
  for (auto& [n, p] : s.params) ps.push_back(p);
  s.opt = std::make_unique<torch::optim::AdamW>(ps, torch::optim::AdamWOptions(1e-2).weight_decay(0.1));
  return s;
}

void step(Setup& s, int k) {
  s.opt->zero_grad();
  torch::Tensor loss = torch::zeros({});
  for (auto& [n, p] : s.params) loss = loss + (p * p * static_cast<double>(k + 1)).sum() + p.sin().sum();
  loss.backward();
  s.opt->step();
}

void copy_params(Setup& to, const Setup& from) {
  torch::NoGradGuard ng;
  for (size_t i = 0; i < to.params.size(); ++i) to.params[i].second.copy_(from.params[i].second);
}

fs::path temp_dir(const std::string& name) {
  auto d = fs::temp_directory_path() / ("peftfw_optstate_" + name + "_" + std::to_string(::getpid()));
  io::remove_tree(d);
  fs::create_directories(d);
  return d;
}

void expect_same_continuation(Setup& original, Setup& restored) {
  for (int k = 3; k < 6; ++k) {
    step(original, k);
    step(restored, k);
  }
  for (size_t i = 0; i < original.params.size(); ++i)
    EXPECT_TRUE(torch::equal(original.params[i].second, restored.params[i].second)) << original.params[i].first;
}

TEST(OptimizerState, SafetensorsRoundTripContinuesExactly) {
  auto dir = temp_dir("roundtrip");
  auto a = make(1);
  for (int k = 0; k < 3; ++k) step(a, k);
  train::save_adamw_state(dir, *a.opt, a.params);
  EXPECT_TRUE(fs::exists(dir / "optimizer.safetensors"));
  EXPECT_TRUE(fs::exists(dir / "optimizer.json"));
  EXPECT_FALSE(fs::exists(dir / "optimizer.pt"));
  auto b = make(2);  // other values: everything must come from the files
  copy_params(b, a);
  std::ostringstream log;
  train::load_adamw_state(dir, *b.opt, b.params, log);
  EXPECT_TRUE(log.str().empty());
  expect_same_continuation(a, b);
  io::remove_tree(dir);
}

TEST(OptimizerState, LegacyPickleArchiveStillReadWithANote) {
  auto dir = temp_dir("legacy");
  auto a = make(3);
  for (int k = 0; k < 3; ++k) step(a, k);
  torch::save(*a.opt, (dir / "optimizer.pt").string());
  auto b = make(4);
  copy_params(b, a);
  std::ostringstream log;
  train::load_adamw_state(dir, *b.opt, b.params, log);
  EXPECT_NE(log.str().find("optimizer.pt"), std::string::npos) << log.str();
  expect_same_continuation(a, b);
  io::remove_tree(dir);
}

TEST(OptimizerState, DamagedFilesAreNamed) {
  auto dir = temp_dir("damaged");
  auto a = make(5);
  step(a, 0);
  train::save_adamw_state(dir, *a.opt, a.params);
  std::ostringstream log;
  std::ofstream(dir / "optimizer.json") << "{\"format\": \"peftfw-adamw-1\", \"steps\": [1, 2]}";
  peftfw::testing::expect_input_error([&] { train::load_adamw_state(dir, *a.opt, a.params, log); },
                              {(dir / "optimizer.json").string(), "damaged"});
  train::save_adamw_state(dir, *a.opt, a.params);
  std::ofstream(dir / "optimizer.safetensors") << "garbage";
  peftfw::testing::expect_input_error([&] { train::load_adamw_state(dir, *a.opt, a.params, log); },
                              {(dir / "optimizer.safetensors").string()});
  auto other = make(6);
  other.params[0].second = torch::randn({2, 2}).requires_grad_();  // a shape the file does not fit
  train::save_adamw_state(dir, *a.opt, a.params);
  peftfw::testing::expect_input_error([&] { train::load_adamw_state(dir, *other.opt, other.params, log); },
                              {"a.lora_A.exp_avg", "[4, 3]", "[2, 2]"});
  io::remove_tree(dir);
}

}  // namespace
