// The memory-lean loss against LibTorch's cross_entropy over full logits
// (causal_lm_loss), value and gradients, across row blocks and ignored labels, with a frozen
// weight (the rows' gradient is formed in the forward) and a trainable one.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "peftfw/model/causal_lm.hpp"

namespace {

double rel_err(const torch::Tensor& a, const torch::Tensor& b) {
  return (a - b).abs().max().item<double>() / std::max(b.abs().max().item<double>(), 1e-30);
}

struct Case {
  int64_t max_elements;  // small values force several row blocks
  bool weight_grad;
};

class LeanLoss : public ::testing::TestWithParam<Case> {};

TEST_P(LeanLoss, EqualsFullLogitsCrossEntropy) {
  const auto c = GetParam();
  torch::manual_seed(11);
  const int64_t B = 3, T = 9, H = 16, V = 37;
  const double divisor = 2.5;
  auto hidden = torch::randn({B, T, H}, torch::requires_grad());
  auto weight = torch::randn({V, H}).requires_grad_(c.weight_grad);
  auto labels = torch::randint(0, V, {B, T}, torch::kLong);
  labels.index_put_({0, torch::indexing::Slice(0, 4)}, -100);  // prompt tokens
  labels.index_put_({2, 5}, -100);

  auto expected = peftfw::causal_lm_loss(torch::nn::functional::linear(hidden, weight) / divisor, labels);
  std::vector<torch::Tensor> wrt = {hidden};
  if (c.weight_grad) wrt.push_back(weight);
  const auto g_out = torch::full({}, 0.37);  // an incoming gradient other than 1 (e.g. accumulation)
  auto g_expected = torch::autograd::grad({expected}, wrt, {g_out});

  auto lean = peftfw::causal_lm_loss_from_hidden(hidden, weight, divisor, labels, c.max_elements);
  auto g_lean = torch::autograd::grad({lean}, wrt, {g_out});
  EXPECT_NEAR(lean.item<double>(), expected.item<double>(), 1e-6 * expected.item<double>());
  for (size_t i = 0; i < wrt.size(); ++i) EXPECT_LE(rel_err(g_lean[i], g_expected[i]), 1e-5) << i;
  // The ignored positions and the last row get no gradient.
  EXPECT_EQ(g_lean[0].select(1, T - 1).abs().max().item<double>(), 0.0);
  EXPECT_EQ(g_lean[0][0][2].abs().max().item<double>(), 0.0);  // predicts label[0][3] = -100
}

INSTANTIATE_TEST_SUITE_P(Blocks, LeanLoss,
                         ::testing::Values(Case{1 << 28, false}, Case{37 * 5, false}, Case{37 * 5, true},
                                           Case{1, true}));

TEST(LeanLoss, AllIgnoredIsNaNLikeCrossEntropy) {
  auto hidden = torch::randn({1, 4, 8});
  auto weight = torch::randn({5, 8});
  auto labels = torch::full({1, 4}, -100, torch::kLong);
  EXPECT_TRUE(std::isnan(peftfw::causal_lm_loss_from_hidden(hidden, weight, 1.0, labels).item<double>()));
}

}  // namespace
