// LibTorch reference implementations of the Mamba-2 SSD ops.
//
// These follow transformers' torch_forward (GraniteMoeHybrid / Bamba mixer)
// step for step so float32 results agree to rounding, with two deliberate
// differences: the C·B product is an einsum (transformers materialises a
// (batch, chunk, l, s, heads, state) tensor first, ~8 MB per token per layer),
// and per-token sequence ids reset the state, which transformers' pure path
// cannot do. A reset is encoded as a log-decay of -inf at the first token of a
// sequence; every decay is formed from masked cumulative sums (never by
// subtracting cumsums), so -inf only ever yields exp(-inf) = 0, never NaN.
#include <torch/torch.h>

#include <limits>

#include "../common/reference_util.hpp"
#include "peftfw/kernels/mamba2.hpp"

namespace peftfw::kernels::mamba2 {
namespace F = torch::nn::functional;

torch::Tensor ssd_dt(const torch::Tensor& dt, const torch::Tensor& dt_bias, double dt_min,
                     double dt_max) {
  auto out = F::softplus(dt + dt_bias.to(dt.scalar_type()));
  return torch::clamp(out, dt_min, dt_max);
}

namespace {

using reference_util::kNoSequence;
using reference_util::shift_right;

// segsum(x)[..., l, s] = sum_{k=s+1..l} x[..., k] for l >= s, -inf above the diagonal.
torch::Tensor segment_sum(const torch::Tensor& x) {
  const int64_t L = x.size(-1);
  auto sizes = x.sizes().vec();
  sizes.push_back(L);
  auto expanded = x.unsqueeze(-1).expand(sizes);  // [..., l, s] = x[l]
  auto opts = torch::TensorOptions().dtype(torch::kBool).device(x.device());
  auto strictly_lower = torch::tril(torch::ones({L, L}, opts), -1);
  auto lower = torch::tril(torch::ones({L, L}, opts), 0);
  auto seg = torch::cumsum(expanded.masked_fill(strictly_lower.logical_not(), 0), -2);
  return seg.masked_fill(lower.logical_not(), -std::numeric_limits<float>::infinity());
}

}  // namespace

namespace reference {

SsdResult ssd_chunk_scan(const SsdArgs& a) {
  TORCH_CHECK(a.x.dim() == 4, "ssd_chunk_scan: x must be [B,T,H,P], got ", a.x.sizes());
  const int64_t Bsz = a.x.size(0), T = a.x.size(1), H = a.x.size(2), P = a.x.size(3);
  TORCH_CHECK(a.B.dim() == 4 && a.B.size(0) == Bsz && a.B.size(1) == T,
              "ssd_chunk_scan: B must be [B,T,G,N], got ", a.B.sizes());
  TORCH_CHECK(a.C.sizes() == a.B.sizes(), "ssd_chunk_scan: C must match B's shape");
  const int64_t G = a.B.size(2), N = a.B.size(3), Lc = a.chunk_size;
  TORCH_CHECK(H % G == 0, "ssd_chunk_scan: heads (", H, ") must be a multiple of groups (", G, ")");
  TORCH_CHECK(Lc > 0, "ssd_chunk_scan: chunk_size must be positive");
  const auto f32 = torch::kFloat32;

  auto dt = ssd_dt(a.dt, a.dt_bias, a.dt_min, a.dt_max);  // input dtype, as transformers
  auto x = a.x.to(f32);
  auto Bm = a.B.to(f32).repeat_interleave(H / G, 2);  // head h uses group h / (H/G)
  auto Cm = a.C.to(f32).repeat_interleave(H / G, 2);
  auto A = -torch::exp(a.A_log.to(f32));

  auto xd = x * dt.unsqueeze(-1);  // dt promoted to float32
  auto ad = A * dt;                // [B,T,H] log-decay per step
  if (a.seq_ids.defined()) {
    auto reset = a.seq_ids.ne(shift_right(a.seq_ids, 1, static_cast<double>(kNoSequence)));
    reset.select(1, 0).fill_(false);  // the initial state belongs to the first sequence
    ad = torch::where(reset.unsqueeze(-1), -std::numeric_limits<float>::infinity(), ad);
  }

  const int64_t pad = (Lc - T % Lc) % Lc, nc = (T + pad) / Lc;
  auto chunk = [&](const torch::Tensor& t) {  // [B,T,...] -> [B,nc,Lc,...], zero padded
    std::vector<int64_t> p(2 * (t.dim() - 1), 0);
    p[p.size() - 1] = pad;
    auto padded = pad ? F::pad(t, F::PadFuncOptions(p)) : t;
    auto sizes = padded.sizes().vec();
    sizes[1] = Lc;
    sizes.insert(sizes.begin() + 1, nc);
    return padded.reshape(sizes);
  };
  auto xc = chunk(xd);                        // [B,nc,Lc,H,P]
  auto ac = chunk(ad).permute({0, 3, 1, 2});  // [B,H,nc,Lc]
  auto Bc = chunk(Bm), Cc = chunk(Cm);        // [B,nc,Lc,H,N]

  auto A_cumsum = torch::cumsum(ac, -1);  // [B,H,nc,Lc]
  auto seg = segment_sum(ac);             // [B,H,nc,Lc,Lc]

  // 1. Within-chunk outputs: y_l = sum_s (C_l . B_s) exp(seg[l,s]) dt_s x_s
  auto CB = torch::einsum("bclhn,bcshn->bhcls", {Cc, Bc});
  auto y_diag = torch::einsum("bhcls,bcshp->bclhp", {CB * torch::exp(seg), xc});

  // 2. State at the end of each chunk from that chunk's inputs.
  auto decay_states = torch::exp(seg.select(-2, Lc - 1));  // [B,H,nc,Lc]
  auto states = torch::einsum("bclhn,bhcl,bclhp->bchpn", {Bc, decay_states, xc});

  // 3. Carry states across chunks.
  auto init = a.initial_state.defined()
                  ? a.initial_state.to(f32).unsqueeze(1)
                  : torch::zeros({Bsz, 1, H, P, N}, x.options());
  states = torch::cat({init, states}, 1);  // [B,nc+1,H,P,N]
  auto chunk_decay = F::pad(A_cumsum.select(-1, Lc - 1), F::PadFuncOptions({1, 0}));
  auto decay_chunk = torch::exp(segment_sum(chunk_decay));  // [B,H,nc+1,nc+1]
  auto new_states = torch::einsum("bhzc,bchpn->bzhpn", {decay_chunk, states});
  auto prev_states = new_states.narrow(1, 0, nc);
  auto final_state = new_states.select(1, nc);

  // 4. Contribution of the state entering each chunk.
  auto y_off = torch::einsum("bclhn,bchpn,bhcl->bclhp", {Cc, prev_states, torch::exp(A_cumsum)});

  auto y = (y_diag + y_off).reshape({Bsz, nc * Lc, H, P}).narrow(1, 0, T);
  if (a.D.defined()) y = y + a.D.unsqueeze(-1) * x;
  return {y, final_state};
}

torch::Tensor ssd_step(SsdStepArgs& a) {
  const int64_t H = a.x.size(1), G = a.B.size(1);
  auto dt = ssd_dt(a.dt, a.dt_bias, a.dt_min, a.dt_max).to(torch::kFloat32);  // [B,H]
  auto A = -torch::exp(a.A_log.to(torch::kFloat32));
  auto dA = torch::exp(dt * A).unsqueeze(-1).unsqueeze(-1);  // [B,H,1,1]
  auto Bh = a.B.to(torch::kFloat32).repeat_interleave(H / G, 1);  // [B,H,N]
  auto Ch = a.C.to(torch::kFloat32).repeat_interleave(H / G, 1);
  auto x = a.x.to(torch::kFloat32);
  auto dBx = (dt.unsqueeze(-1) * Bh).unsqueeze(2) * x.unsqueeze(-1);  // [B,H,P,N]
  a.state = a.state * dA + dBx;
  auto y = torch::einsum("bhpn,bhn->bhp", {a.state, Ch});
  if (a.D.defined()) y = y + a.D.to(torch::kFloat32).unsqueeze(-1) * x;
  return y;
}

}  // namespace reference
}  // namespace peftfw::kernels::mamba2
