// LibTorch reference implementations of the shared ops (peftfw/kernels/ops.hpp).
//
// These follow transformers' torch_forward (GraniteMoeHybrid / Bamba mixer) step for step
// so float32 results agree to rounding; per-token sequence ids stop the conv window at
// sequence boundaries, which transformers' pure path cannot do.
#include <torch/torch.h>

#include <limits>

#include "reference_util.hpp"
#include "peftfw/kernels/ops.hpp"

namespace peftfw::kernels {
namespace F = torch::nn::functional;

namespace {

using reference_util::kNoSequence;
using reference_util::shift_right;

}  // namespace

namespace reference {

torch::Tensor causal_conv1d(const torch::Tensor& x, const torch::Tensor& weight,
                            const torch::Tensor& bias, const torch::Tensor& seq_ids, bool silu) {
  TORCH_CHECK(x.dim() == 3, "causal_conv1d: x must be [B,T,C], got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == x.size(2),
              "causal_conv1d: weight must be [C,K] with C=", x.size(2), ", got ", weight.sizes());
  const int64_t T = x.size(1), C = x.size(2), K = weight.size(1);
  torch::Tensor out;
  if (!seq_ids.defined()) {
    auto o = F::conv1d(x.transpose(1, 2), weight.unsqueeze(1),
                       F::Conv1dFuncOptions().bias(bias).padding(K - 1).groups(C));
    out = o.narrow(2, 0, T).transpose(1, 2);
  } else {
    TORCH_CHECK(seq_ids.sizes() == x.sizes().slice(0, 2), "causal_conv1d: seq_ids must be [B,T]");
    // out[t] = bias + sum_j w[:, j] * x[t-(K-1)+j], counting only taps in t's sequence.
    out = bias.defined() ? bias.to(x.scalar_type()).expand_as(x) : torch::zeros_like(x);
    for (int64_t j = 0; j < K; ++j) {
      const int64_t shift = K - 1 - j;
      if (shift >= T) continue;
      auto xs = shift_right(x, shift, 0.0);
      auto tap = xs * weight.select(1, j);
      if (shift > 0) {
        auto same = seq_ids.eq(shift_right(seq_ids, shift, static_cast<double>(kNoSequence)));
        tap = tap * same.unsqueeze(-1).to(x.scalar_type());
      }
      out = out + tap;
    }
  }
  return silu ? F::silu(out) : out;
}

torch::Tensor gated_rms_norm(const torch::Tensor& y, const torch::Tensor& z,
                             const torch::Tensor& weight, double eps,
                             std::optional<torch::ScalarType> out_dtype) {
  auto g = y.to(torch::kFloat32);
  if (z.defined()) g = g * F::silu(z.to(torch::kFloat32));
  auto var = g.pow(2).mean(-1, /*keepdim=*/true);
  g = g * torch::rsqrt(var + eps);
  auto out = weight * g.to(y.scalar_type());
  return out_dtype ? out.to(*out_dtype) : out;
}

torch::Tensor silu_mul(const torch::Tensor& gu) {
  TORCH_CHECK(gu.dim() >= 1 && gu.size(-1) % 2 == 0,
              "silu_mul: the last dim must hold two equal halves, got ", gu.sizes());
  auto u = gu.chunk(2, -1);
  return F::silu(u[0]) * u[1];
}

torch::Tensor causal_conv1d_step(torch::Tensor& conv_state, const torch::Tensor& x_t,
                                 const torch::Tensor& weight, const torch::Tensor& bias, bool silu) {
  const int64_t K = conv_state.size(2);
  conv_state = torch::cat({conv_state.narrow(2, 1, K - 1), x_t.unsqueeze(-1).to(conv_state.scalar_type())}, 2);
  auto out = (conv_state * weight.unsqueeze(0)).sum(-1);
  if (bias.defined()) out = out + bias;
  return silu ? F::silu(out) : out;
}

}  // namespace reference
}  // namespace peftfw::kernels
