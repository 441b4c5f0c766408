// LibTorch reference of the Mamba-1 selective scan (peftfw/kernels/mamba1.hpp).
//
// It follows transformers' MambaMixer.slow_forward: dt = softplus(delta) in delta's dtype,
// the discretisation and the state in float32, one step per token. Two differences, both
// deliberate: y is formed from the float32 state (transformers rounds the state to the model
// dtype before the C product, which only changes bf16 results, by rounding), and sequence ids
// reset the state at the start of each packed sequence, which transformers cannot do.
#include <torch/torch.h>

#include "../common/reference_util.hpp"
#include "peftfw/kernels/mamba1.hpp"

namespace peftfw::kernels::mamba1::reference {
namespace F = torch::nn::functional;

namespace {

void check_scan(const ScanArgs& a) {
  TORCH_CHECK(a.u.dim() == 3, "selective_scan: u must be [B,T,D], got ", a.u.sizes());
  const int64_t Bsz = a.u.size(0), T = a.u.size(1), D = a.u.size(2);
  TORCH_CHECK(a.delta.sizes() == a.u.sizes(), "selective_scan: delta must match u ", a.u.sizes(), ", got ",
              a.delta.sizes());
  TORCH_CHECK(a.A_log.dim() == 2 && a.A_log.size(0) == D, "selective_scan: A_log must be [", D, ",N], got ",
              a.A_log.sizes());
  const int64_t N = a.A_log.size(1);
  for (const auto* t : {&a.B, &a.C})
    TORCH_CHECK(t->dim() == 3 && t->size(0) == Bsz && t->size(1) == T && t->size(2) == N,
                "selective_scan: B and C must be [", Bsz, ",", T, ",", N, "], got ", t->sizes());
  TORCH_CHECK(!a.D.defined() || (a.D.dim() == 1 && a.D.size(0) == D), "selective_scan: D must be [", D, "]");
  TORCH_CHECK(!a.z.defined() || a.z.sizes() == a.u.sizes(), "selective_scan: z must match u");
  TORCH_CHECK(!a.initial_state.defined() || a.initial_state.sizes() == torch::IntArrayRef({Bsz, D, N}),
              "selective_scan: initial_state must be [", Bsz, ",", D, ",", N, "]");
  TORCH_CHECK(!a.seq_ids.defined() || a.seq_ids.sizes() == torch::IntArrayRef({Bsz, T}),
              "selective_scan: seq_ids must be [", Bsz, ",", T, "]");
}

}  // namespace

ScanResult selective_scan(const ScanArgs& a) {
  check_scan(a);
  const auto f32 = torch::kFloat32;
  const int64_t Bsz = a.u.size(0), T = a.u.size(1), D = a.u.size(2), N = a.A_log.size(1);
  auto dt = F::softplus(a.delta).to(f32);  // rounded to delta's dtype first, as transformers
  auto u = a.u.to(f32);
  auto A = -torch::exp(a.A_log.to(f32));                          // [D,N]
  auto dA = torch::exp(dt.unsqueeze(-1) * A);                     // [B,T,D,N]
  auto dBu = (dt * u).unsqueeze(-1) * a.B.to(f32).unsqueeze(2);   // [B,T,D,N]
  if (a.seq_ids.defined()) {
    using reference_util::kNoSequence;
    auto reset = a.seq_ids.ne(reference_util::shift_right(a.seq_ids, 1, static_cast<double>(kNoSequence)));
    reset.select(1, 0).fill_(false);  // the initial state belongs to the first sequence
    dA = dA.masked_fill(reset.unsqueeze(-1).unsqueeze(-1), 0.0);
  }
  // transformers forms y from the state rounded to the input dtype, times C in that dtype, and
  // the gate silu(z) in z's dtype; in float32 these roundings are no-ops.
  const auto io = a.u.scalar_type();
  auto C = a.C.to(io);
  auto state = a.initial_state.defined() ? a.initial_state.to(f32) : torch::zeros({Bsz, D, N}, u.options());
  std::vector<torch::Tensor> ys;
  ys.reserve(static_cast<size_t>(T));
  // unbind, not select: the backward of T selects would build T full-size gradients.
  const auto dA_t = dA.unbind(1), dBu_t = dBu.unbind(1), C_t = C.unbind(1);
  for (int64_t t = 0; t < T; ++t) {
    state = dA_t[t] * state + dBu_t[t];
    ys.push_back(torch::matmul(state.to(io), C_t[t].unsqueeze(-1)).squeeze(-1));  // [B,D]
  }
  auto y = T > 0 ? torch::stack(ys, 1).to(f32) : torch::zeros({Bsz, 0, D}, u.options());
  if (a.D.defined()) y = y + u * a.D.to(f32);
  if (a.z.defined()) y = y * F::silu(a.z).to(f32);
  return {y, state};
}

torch::Tensor selective_scan_step(StepArgs& a) {
  const auto f32 = torch::kFloat32;
  auto dt = F::softplus(a.delta).to(f32);  // [B,D]
  auto u = a.u.to(f32);
  auto A = -torch::exp(a.A_log.to(f32));
  auto dA = torch::exp(dt.unsqueeze(-1) * A);                               // [B,D,N]
  auto dBu = (dt * u).unsqueeze(-1) * a.B.to(f32).unsqueeze(1);             // [B,D,N]
  a.state = dA * a.state + dBu;
  auto y = torch::matmul(a.state, a.C.to(f32).unsqueeze(-1)).squeeze(-1);  // [B,D]
  if (a.D.defined()) y = y + u * a.D.to(f32);
  if (a.z.defined()) y = y * F::silu(a.z.to(f32));
  return y;
}

}  // namespace peftfw::kernels::mamba1::reference
