// Memory-lean causal-LM loss: cross-entropy over the vocabulary a block of
// rows at a time, with the logits recomputed in backward. At a 100k
// vocabulary and 32 x 1280 tokens, full float32 logits are 16 GB; here
// at most `max_elements` (1 GB in float32 by default) exist at once.
#include <torch/torch.h>

#include <limits>

#include "peftfw/kernels/row_nll.hpp"
#include "peftfw/model/causal_lm.hpp"

namespace peftfw {
namespace {

using torch::Tensor;

// d loss / d logits = (softmax - onehot) / n for a unit incoming gradient; the logits carry
// 1 / divisor. A float32 scalar on rows' device.
Tensor unit_scale(const Tensor& rows, int64_t n, double divisor) {
  return torch::full({}, 1.0 / (static_cast<double>(n) * divisor), rows.options().dtype(torch::kFloat32));
}

class LeanCrossEntropy : public torch::autograd::Function<LeanCrossEntropy> {
 public:
  // rows [n,Hd] (labelled positions only), targets [n]. With `eager`, the gradient with respect
  // to rows (for a unit incoming gradient) is formed here, from the logits this pass already
  // has, so the backward only scales it: no second logits GEMM (a frozen weight only).
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& rows, const Tensor& weight,
                        const Tensor& targets, double divisor, int64_t block, bool eager) {
    torch::NoGradGuard no_grad;
    const int64_t n = rows.size(0);
    auto total = torch::zeros({}, rows.options().dtype(torch::kFloat64));
    auto lse = torch::empty({n}, rows.options().dtype(torch::kFloat32));  // kept for backward
    Tensor drows = eager ? torch::empty_like(rows) : Tensor();
    const auto unit = unit_scale(rows, n, divisor);
    for (int64_t r = 0; r < n; r += block) {
      const int64_t m = std::min(block, n - r);
      auto logits = torch::matmul(rows.narrow(0, r, m), weight.t());
      auto t = targets.narrow(0, r, m);
      auto nll = kernels::row_nll(logits, t, divisor);
      lse.narrow(0, r, m).copy_(nll.lse);
      total += nll.loss.sum(0, false, torch::kFloat64);
      if (eager) drows.narrow(0, r, m).copy_(torch::matmul(kernels::row_nll_backward(logits, t, nll.lse, divisor, unit), weight));
    }
    if (eager) ctx->save_for_backward({drows});
    else ctx->save_for_backward({rows, weight, targets, lse});
    ctx->saved_data["eager"] = eager;
    ctx->saved_data["divisor"] = divisor;
    ctx->saved_data["block"] = block;
    return (total / static_cast<double>(n)).to(torch::kFloat32);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    if (ctx->saved_data["eager"].toBool()) {
      const auto& drows = saved[0];
      return {(drows.to(torch::kFloat32) * grads[0].to(torch::kFloat32)).to(drows.scalar_type()), Tensor(),
              Tensor(), Tensor(), Tensor(), Tensor()};
    }
    const Tensor &rows = saved[0], &weight = saved[1], &targets = saved[2], &lse = saved[3];
    const double divisor = ctx->saved_data["divisor"].toDouble();
    const int64_t block = ctx->saved_data["block"].toInt(), n = rows.size(0);
    const bool want_w = ctx->needs_input_grad(1);
    auto scale = grads[0].to(torch::kFloat32) * unit_scale(rows, n, divisor);
    auto drows = torch::empty_like(rows);
    Tensor dweight = want_w ? torch::zeros(weight.sizes(), weight.options().dtype(torch::kFloat32)) : Tensor();
    for (int64_t r = 0; r < n; r += block) {
      const int64_t m = std::min(block, n - r);
      auto x = rows.narrow(0, r, m);
      auto dlogits = kernels::row_nll_backward(torch::matmul(x, weight.t()), targets.narrow(0, r, m),
                                               lse.narrow(0, r, m), divisor, scale);
      drows.narrow(0, r, m).copy_(torch::matmul(dlogits, weight));
      if (want_w) dweight += torch::matmul(dlogits.t(), x).to(torch::kFloat32);
    }
    return {drows, want_w ? dweight.to(weight.scalar_type()) : Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

}  // namespace

Tensor causal_lm_loss_from_hidden(const Tensor& hidden, const Tensor& weight, double logits_divisor,
                                  const Tensor& labels, int64_t max_elements) {
  TORCH_CHECK(hidden.dim() == 3 && labels.dim() == 2 && hidden.sizes().slice(0, 2) == labels.sizes(),
              "causal_lm_loss_from_hidden: hidden must be [B,T,H] and labels [B,T]");
  const int64_t B = hidden.size(0), T = hidden.size(1), Hd = hidden.size(2), V = weight.size(0);
  // Tokens < n predict token n: every row but the last, labels shifted left.
  auto rows = hidden.narrow(1, 0, T - 1).reshape({B * (T - 1), Hd});
  auto targets = labels.narrow(1, 1, T - 1).reshape({-1});
  auto keep = targets.ne(-100).nonzero().squeeze(1);
  if (keep.numel() == 0)  // as cross_entropy's mean over nothing
    return torch::full({}, std::numeric_limits<float>::quiet_NaN(), hidden.options().dtype(torch::kFloat32));
  const int64_t block = std::max<int64_t>(1, max_elements / V);
  auto kept_rows = rows.index_select(0, keep);
  const bool eager = torch::GradMode::is_enabled() && kept_rows.requires_grad() && !weight.requires_grad();
  return LeanCrossEntropy::apply(kept_rows, weight, targets.index_select(0, keep), logits_divisor, block, eager);
}

}  // namespace peftfw
