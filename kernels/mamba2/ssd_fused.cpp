// Chunked SSD scan with a hand-written backward (the fast path).
//
// Same mathematics as reference::ssd_chunk_scan, organised for speed and
// memory instead of for line-by-line agreement with transformers:
//  - one autograd node instead of ~40: nothing but the inputs and the chunk
//    boundary states is saved, the rest is recomputed in backward;
//  - the heavy products are batched GEMMs in the input's 16-bit dtype with
//    float32 accumulation (float32 inputs stay float32 throughout);
//  - heads of one group share B and C, so B/C products are done once per
//    group, with the group's heads side by side as the columns of one larger
//    GEMM;
//  - sequence resets are segment ids within a chunk (two positions interact
//    only inside the same segment), so no -inf enters any sum and
//    exp(cum_l - cum_s) <= 1 always;
//  - the two elementwise passes over the [Lc,Lc] decay matrices (building
//    the masked decay-weighted C.B matrix, and its backward) are CUDA kernels
//    when built (cuda/ssd_masks.cu), LibTorch expressions otherwise.
//
// Notation per batch b, chunk c, head h (group g = h / (H/G)), positions l, s:
//   a_t = A dt_t, cum_l = sum_{k<=l} a_k, u_s = dt_s x_s
//   M[l,s] = (C_l . B_s) exp(cum_l - cum_s)  for l >= s in one segment, else 0
//   y_l = sum_s M[l,s] u_s + E_l (C_l . H_c)     E_l = exp(cum_l) if seg_l == 0
//   S_c = sum_s Ld_s u_s B_s^T                    Ld_s = exp(cum_last - cum_s) if seg_s == seg_last
//   H_{c+1} = dec_c H_c + S_c                     dec_c = exp(cum_last) if the chunk has no reset
//
// Memory traffic is what costs here (x, the chunk states and M are each of
// the order of B*T*H*P elements), so the large tensors live in two layouts
// chosen so that every GEMM reads and writes them in place, through strided
// views, without permute copies:
//  - "time-major" [B,nc,Lc,H,P] (x's own layout): the group GEMMs, whose
//    operands are a group's heads side by side, [Lc, Hg*P], with row stride
//    H*P: states, y_off, and their backward;
//  - "head-major" [B,nc,H,Lc,P]: the per-head [Lc,Lc] products with M.
// Each large intermediate is written once, in the GEMM dtype, by the
// elementwise pass that has to touch it anyway (u = dt x is written straight
// into head-major order, u*Ld into time-major order, y in float32 by one
// final pass that adds the two halves).
#include <torch/torch.h>

#include <tuple>
#include <vector>

#include "peftfw/kernels/mamba2.hpp"
#include "peftfw/kernels/ssd_fused.hpp"

namespace peftfw::kernels::mamba2::fused {
namespace F = torch::nn::functional;
using torch::Tensor;
using torch::indexing::Slice;

namespace {

MaskKernels g_mask_kernels;  // CUDA implementations, registered when built

// Everything the forward and the backward both derive from the inputs.
struct Prep {
  int64_t Bsz, T, H, P, G, N, Hg, Lc, nc, Tp;
  bool fused;             // the per-chunk CUDA kernels do the heavy work (Lc = 128; xc, dtp, Bt, Ct unused)
  torch::ScalarType cdt;  // GEMM dtype: the input's 16-bit type, else float32
  Tensor xc;              // [B,nc,Lc,H,P] x (input dtype), zero padded (a view when no padding)
  Tensor dtp;             // [B,nc,Lc,H] float32, zero padded (undefined when fused)
  Tensor cum;             // [B,nc,H,Lc] float32 within-chunk cumulative log-decay
  Tensor seg;             // [B,nc,Lc] int32 segment index within the chunk
  Tensor Bt, Ct;          // [B,nc,Lc,G,N] cdt, contiguous (time-major)
  Tensor Bg32, Cg32;      // [B,nc,G,Lc,N] float32
  Tensor CB;              // [B,nc,G,Lc,Lc] float32
  Tensor Ld, E;           // [B,nc,H,Lc] float32
  Tensor dec;             // [B,nc,H] float32
};

Tensor pad_time(const Tensor& t, int64_t pad) {  // pads dim 1 of [B,T,...] at the end
  if (pad == 0) return t;
  std::vector<int64_t> p(2 * (t.dim() - 1), 0);
  p[p.size() - 1] = pad;
  return F::pad(t, F::PadFuncOptions(p));
}

// [B,Tp,...] -> [B,nc,Lc,...]
Tensor chunked(const Tensor& t, int64_t nc, int64_t Lc) {
  auto sizes = t.sizes().vec();
  sizes[1] = Lc;
  sizes.insert(sizes.begin() + 1, nc);
  return t.reshape(sizes);
}

// [B,nc,H,Lc] -> [B,nc,Lc,H,1] view, to scale time-major [B,nc,Lc,H,P] rows.
Tensor per_row(const Tensor& t) { return t.permute({0, 1, 3, 2}).unsqueeze(-1); }

// [B,nc,H,Lc,...] <-> [B,nc,Lc,H,...] views.
Tensor swap_hl(const Tensor& t) { return t.transpose(2, 3); }

// The unpadded positions [0,T) as (first chunk, number of chunks, length of
// each): the full chunks, then the partial last one. f(c0, n, len).
template <class Fn>
void over_time(const Prep& p, Fn&& f) {
  const int64_t nfull = p.T / p.Lc, rem = p.T - nfull * p.Lc;
  if (nfull) f(int64_t{0}, nfull, p.Lc);
  if (rem) f(nfull, int64_t{1}, rem);
}
// Positions of chunks [c0, c0+n) (each `len` long) of an unpadded [B,T,...] tensor: [B,n,len,...].
Tensor time_part(const Tensor& t, const Prep& p, int64_t c0, int64_t n, int64_t len) {
  auto v = t.narrow(1, c0 * p.Lc, n * len);
  auto sizes = v.sizes().vec();
  sizes[1] = len;
  sizes.insert(sizes.begin() + 1, n);
  return v.view(sizes);
}
// The same positions of a chunked time-major [B,nc,Lc,...] tensor.
Tensor chunk_part(const Tensor& t, int64_t c0, int64_t n, int64_t len) {
  return t.narrow(1, c0, n).narrow(2, 0, len);
}

// Group g's columns of a time-major [B,nc,Lc,H,P] tensor: [B*nc, Lc, Hg*P] (row stride H*P).
Tensor group_cols(const Tensor& t, const Prep& p, int64_t g) {
  return t.view({p.Bsz * p.nc, p.Lc, p.H * p.P}).narrow(2, g * p.Hg * p.P, p.Hg * p.P);
}
// Group g's B or C, from [B,nc,Lc,G,N]: [B*nc, Lc, N] (row stride G*N).
Tensor group_bc(const Tensor& t, const Prep& p, int64_t g) {
  return t.view({p.Bsz * p.nc, p.Lc, p.G * p.N}).narrow(2, g * p.N, p.N);
}
// Group g's heads of a [B,nc,H,P,N] state tensor: [B*nc, Hg*P, N].
Tensor group_states(const Tensor& t, const Prep& p, int64_t g) {
  return t.view({p.Bsz * p.nc, p.H * p.P, p.N}).narrow(1, g * p.Hg * p.P, p.Hg * p.P);
}

// Whether the fused per-chunk CUDA kernels take this call: all of them registered (with the
// bookkeeping, the chunk states and the state recurrence's backward), chunk 128, and x, B and C
// of one 16-bit dtype (dB and dC come back in it).
bool chunk_kernels_for(const Tensor& x, const Tensor& B, const Tensor& C, int64_t chunk) {
  const auto& k = g_mask_kernels;
  return x.is_cuda() && chunk == 128 && B.scalar_type() == x.scalar_type() && C.scalar_type() == x.scalar_type() &&
         k.chunk_supported && k.chunk_scan && k.chunk_bwd_off && k.chunk_bwd_diag && k.chunk_bwd_db && k.chunk_cb &&
         k.chunk_cb_bwd && k.chunk_prep && k.chunk_states_pass && k.chunk_decay_grad && k.states_backward &&
         k.chunk_supported(x, B);
}

// The forward's bookkeeping and C.B (fused path), saved after the node's inputs so that the
// backward does not launch them again: [cum, seg, Ld, E, dec, CB]. (Saved tensors, not
// saved_data: the engine frees them once the node's backward has run. The fused path has no
// Bg32 / Cg32: C.B and its backward are chunk kernels.)
constexpr size_t kSavedInputs = 8, kKept = 6;
std::vector<Tensor> kept_of(const Prep& p) { return {p.cum, p.seg, p.Ld, p.E, p.dec, p.CB}; }

void add_cb(Prep& p, const Tensor& x, const Tensor& dt, const Tensor& B, const Tensor& C);

Prep prepare(const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& B, const Tensor& C,
             const Tensor& seq_ids, int64_t chunk, const std::vector<Tensor>* kept = nullptr) {
  Prep p;
  p.Bsz = x.size(0), p.T = x.size(1), p.H = x.size(2), p.P = x.size(3);
  p.G = B.size(2), p.N = B.size(3), p.Hg = p.H / p.G;
  p.fused = chunk_kernels_for(x, B, C, chunk);
  p.Lc = p.fused ? chunk : std::min<int64_t>(chunk, std::max<int64_t>(32, (p.T + 31) / 32 * 32));
  p.nc = (p.T + p.Lc - 1) / p.Lc, p.Tp = p.nc * p.Lc;
  const int64_t pad = p.Tp - p.T;
  const auto st = x.scalar_type();
  p.cdt = (st == torch::kBFloat16 || st == torch::kHalf) ? st : torch::kFloat32;
  const auto f32 = torch::kFloat32;

  if (!p.fused) p.xc = chunked(pad_time(x, pad), p.nc, p.Lc);  // [B,nc,Lc,H,P]
  if (p.fused && kept != nullptr && kept->size() == kKept) {
    const auto& k = *kept;
    p.cum = k[0], p.seg = k[1], p.Ld = k[2], p.E = k[3], p.dec = k[4], p.CB = k[5];
    return p;
  }
  if (p.fused) {
    auto k = g_mask_kernels.chunk_prep(dt, A, seq_ids, p.nc);
    p.seg = k.seg, p.cum = k.cum, p.Ld = k.Ld, p.E = k.E, p.dec = k.dec;
  } else {
    p.dtp = chunked(pad_time(dt.to(f32), pad), p.nc, p.Lc);  // [B,nc,Lc,H]
    p.cum = torch::cumsum(p.dtp * A.to(f32), 2).permute({0, 1, 3, 2}).contiguous();
    auto reset = torch::zeros({p.Bsz, p.Tp}, x.options().dtype(torch::kInt32));
    if (seq_ids.defined() && p.T > 1) {
      reset.index_put_({Slice(), Slice(1, p.T)},
                       seq_ids.index({Slice(), Slice(1, p.T)})
                           .ne(seq_ids.index({Slice(), Slice(0, p.T - 1)}))
                           .to(torch::kInt32));
    }
    p.seg = torch::cumsum(chunked(reset, p.nc, p.Lc), 2, torch::kInt32);  // [B,nc,Lc]
    auto seg_h = p.seg.unsqueeze(2);  // [B,nc,1,Lc]
    auto cum_last = p.cum.select(-1, p.Lc - 1).unsqueeze(-1);
    auto seg_last = seg_h.select(-1, p.Lc - 1).unsqueeze(-1);
    auto zero = torch::zeros({}, p.cum.options());
    p.Ld = torch::where(seg_h.eq(seg_last), torch::exp(cum_last - p.cum), zero);
    p.E = torch::where(seg_h.eq(0), torch::exp(p.cum), zero);
    p.dec = torch::where(seg_last.squeeze(-1).eq(0), torch::exp(cum_last.squeeze(-1)), zero);
  }

  auto time_major = [&](const Tensor& t) {
    return chunked(pad_time(t.to(p.cdt), pad), p.nc, p.Lc).contiguous();
  };
  if (!p.fused) {
    p.Bt = time_major(B);
    p.Ct = time_major(C);
  }
  add_cb(p, x, dt, B, C);
  return p;
}

// a b for [B,nc,G,.,.] operands as one batched GEMM over views (torch::matmul on five
// dimensions costs several host-side ops more; these run every step).
Tensor bmm5(const Tensor& a, const Tensor& b) {
  return at::bmm(a.flatten(0, 2), b.flatten(0, 2)).view({a.size(0), a.size(1), a.size(2), a.size(3), b.size(4)});
}

ChunkInputs chunk_inputs(const Prep& p, const Tensor& x, const Tensor& dt, const Tensor& B, const Tensor& C,
                         const Tensor& D);

// C.B for prepare(): by the chunk kernel on the fused path, else from B and C group-major in
// float32 (kept for the backward's float32 GEMMs).
void add_cb(Prep& p, const Tensor& x, const Tensor& dt, const Tensor& B, const Tensor& C) {
  if (p.fused) {
    p.CB = g_mask_kernels.chunk_cb(chunk_inputs(p, x, dt, B, C, Tensor()));
    return;
  }
  auto group_major = [&](const Tensor& t) {
    return chunked(pad_time(t.to(torch::kFloat32), p.Tp - p.T), p.nc, p.Lc).permute({0, 1, 3, 2, 4}).contiguous();
  };
  p.Bg32 = group_major(B);
  p.Cg32 = group_major(C);
  p.CB = bmm5(p.Cg32, p.Bg32.transpose(-1, -2));  // [B,nc,G,Lc,Lc]
}

// u = dt x, head-major [B,nc,H,Lc,P] cdt, written in one pass from x.
Tensor make_u_heads(const Prep& p) {
  auto u = torch::empty({p.Bsz, p.nc, p.H, p.Lc, p.P}, p.xc.options().dtype(p.cdt));
  auto out = swap_hl(u);
  at::mul_out(out, p.xc, p.dtp.unsqueeze(-1));
  return u;
}

// u * Ld = x (dt Ld), time-major [B,nc,Lc,H,P] cdt, in one pass from x.
Tensor make_uL(const Prep& p) {
  auto uL = torch::empty({p.Bsz, p.nc, p.Lc, p.H, p.P}, p.xc.options().dtype(p.cdt));
  at::mul_out(uL, p.xc, (p.dtp * p.Ld.permute({0, 1, 3, 2})).unsqueeze(-1));
  return uL;
}

// y_off_raw = C . H_c per head, time-major [B,nc,Lc,H,P] cdt. prev: [B,nc,H,P,N] cdt.
Tensor incoming_term(const Prep& p, const Tensor& prev) {
  auto y_off = torch::empty({p.Bsz, p.nc, p.Lc, p.H, p.P}, prev.options());
  for (int64_t g = 0; g < p.G; ++g) {
    auto out = group_cols(y_off, p, g);
    at::bmm_out(out, group_bc(p.Ct, p, g), group_states(prev, p, g).transpose(1, 2));
  }
  return y_off;
}

// exp(cum_l - cum_s) where l >= s and seg_l == seg_s, else 0: [B,nc,H,Lc,Lc] float32.
Tensor decay_matrix(const Prep& p) {
  auto diff = p.cum.unsqueeze(-1) - p.cum.unsqueeze(-2);
  auto tri = torch::ones({p.Lc, p.Lc}, p.seg.options().dtype(torch::kBool)).tril();
  auto mask = p.seg.unsqueeze(-1).eq(p.seg.unsqueeze(-2)).logical_and(tri).unsqueeze(2);
  return torch::where(mask, torch::exp(diff.masked_fill(mask.logical_not(), 0)),
                      torch::zeros({}, diff.options()));
}

// The CUDA mask kernels handle chunks of 32, 64 or 128 positions.
bool use_kernels(const Prep& p) {
  return p.cum.is_cuda() && (p.Lc == 32 || p.Lc == 64 || p.Lc == 128);
}

Tensor build_M(const Prep& p) {
  if (g_mask_kernels.build && use_kernels(p)) return g_mask_kernels.build(p.CB, p.cum, p.seg, p.Hg, p.cdt);
  auto L = decay_matrix(p).view({p.Bsz, p.nc, p.G, p.Hg, p.Lc, p.Lc});
  return (L * p.CB.unsqueeze(3)).view({p.Bsz, p.nc, p.H, p.Lc, p.Lc}).to(p.cdt);
}

// Backward of M = CB * L: dCB (summed over the group's heads) and the
// log-decay gradient rowsum(W) - colsum(W), W = dM * M.
std::pair<Tensor, Tensor> build_M_backward(const Prep& p, const Tensor& dM) {
  if (g_mask_kernels.backward && use_kernels(p))
    return g_mask_kernels.backward(dM, p.CB, p.cum, p.seg, p.Hg);
  auto L = decay_matrix(p);
  auto dML = dM.to(torch::kFloat32).mul_(L);
  auto dCB = dML.view({p.Bsz, p.nc, p.G, p.Hg, p.Lc, p.Lc}).sum(3);
  auto W = dML.view({p.Bsz, p.nc, p.G, p.Hg, p.Lc, p.Lc}).mul_(p.CB.unsqueeze(3));
  W = W.view({p.Bsz, p.nc, p.H, p.Lc, p.Lc});
  return {dCB, W.sum(-1) - W.sum(-2)};
}

// Rowwise dot over P of two time-major [B,nc,Lc,H,P] tensors, float32 [B,nc,H,Lc].
Tensor dot_p(const Tensor& a, const Tensor& b) {
  return at::mul(a, b).sum(-1, false, torch::kFloat32).permute({0, 1, 3, 2});
}

ChunkInputs chunk_inputs(const Prep& p, const Tensor& x, const Tensor& dt, const Tensor& B, const Tensor& C,
                         const Tensor& D) {
  ChunkInputs in;
  in.x = x, in.dt = dt, in.B = B, in.C = C, in.D = D;
  in.cum = p.cum, in.seg = p.seg, in.CB = p.CB, in.Ld = p.Ld, in.E = p.E;
  in.nc = p.nc;
  return in;
}

class SsdFunction : public torch::autograd::Function<SsdFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const Tensor& x, const Tensor& dt, const Tensor& A,
                                                const Tensor& B, const Tensor& C,
                                                const Tensor& init_in, const Tensor& seq_in,
                                                const Tensor& D_in, int64_t chunk) {
    torch::NoGradGuard no_grad;
    // Absent optional inputs arrive as empty tensors (autograd needs defined ones).
    const Tensor init = init_in.numel() ? init_in : Tensor();
    const Tensor seq_ids = seq_in.numel() ? seq_in : Tensor();
    const Tensor D = D_in.numel() ? D_in : Tensor();
    Prep p = prepare(x, dt, A, B, C, seq_ids, chunk);
    const auto f32 = torch::kFloat32;
    const auto opt = x.options().dtype(p.cdt);
    ctx->saved_data["chunk"] = chunk;
    ctx->saved_data["has_init"] = init.defined();

    if (p.fused) {
      auto [prev, h] = g_mask_kernels.chunk_states_pass(chunk_inputs(p, x, dt, B, C, D), p.dec, init);
      auto y = g_mask_kernels.chunk_scan(chunk_inputs(p, x, dt, B, C, D), prev);
      std::vector<Tensor> saved = {x, dt, A, B, C, seq_in, prev, D_in};
      auto kept = kept_of(p);
      saved.insert(saved.end(), kept.begin(), kept.end());
      ctx->save_for_backward(saved);
      return {y, h};
    }

    // Within-chunk term, head-major [B,nc,H,Lc,P] cdt.
    Tensor y_diag;
    {
      auto u = make_u_heads(p);
      auto M = build_M(p);
      y_diag = at::bmm(M.view({-1, p.Lc, p.Lc}), u.view({-1, p.Lc, p.P}))
                   .view({p.Bsz, p.nc, p.H, p.Lc, p.P});
    }

    // Chunk states from each chunk's own inputs: [Hg*P, Lc] @ [Lc, N] per group.
    auto S = torch::empty({p.Bsz, p.nc, p.H, p.P, p.N}, opt);
    {
      auto uL = make_uL(p);
      for (int64_t g = 0; g < p.G; ++g) {
        auto out = group_states(S, p, g);
        at::bmm_out(out, group_cols(uL, p, g).transpose(1, 2), group_bc(p.Bt, p, g));
      }
    }

    // State passing in float32; the states entering each chunk are kept in cdt.
    // (With float32 inputs the running state lives in `prev` itself, no copies.)
    Tensor prev, h;
    if (g_mask_kernels.states && S.is_cuda()) {
      std::tie(prev, h) = g_mask_kernels.states(S, p.dec, init);
    } else {
      prev = torch::empty({p.Bsz, p.nc, p.H, p.P, p.N}, opt);
      const bool in_place = p.cdt == f32;
      h = in_place ? prev.select(1, 0) : torch::empty({p.Bsz, p.H, p.P, p.N}, x.options().dtype(f32));
      if (init.defined()) h.copy_(init); else h.zero_();
      for (int64_t c = 0; c < p.nc; ++c) {
        auto dec_c = p.dec.select(1, c).unsqueeze(-1).unsqueeze(-1);
        if (in_place) {
          auto next = c + 1 < p.nc ? prev.select(1, c + 1) : torch::empty_like(h);
          at::addcmul_out(next, S.select(1, c), h, dec_c);
          h = next;
        } else {
          prev.select(1, c).copy_(h);
          at::addcmul_out(h, S.select(1, c), h, dec_c);
        }
      }
    }
    S = Tensor();

    // y = y_diag + E * (C . H_c), float32 [B,T,H,P], in one pass.
    auto y_off = incoming_term(p, prev);
    auto y = torch::empty({p.Bsz, p.T, p.H, p.P}, x.options().dtype(f32));
    auto y_diag_t = swap_hl(y_diag), E_t = per_row(p.E);
    over_time(p, [&](int64_t c0, int64_t n, int64_t len) {
      auto out = time_part(y, p, c0, n, len);
      at::addcmul_out(out, chunk_part(y_diag_t, c0, n, len), chunk_part(y_off, c0, n, len),
                      chunk_part(E_t, c0, n, len));
    });

    if (D.defined()) y.addcmul_(D.unsqueeze(-1), x);
    ctx->save_for_backward({x, dt, A, B, C, seq_in, prev, D_in});
    return {y, h};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &dt = saved[1], &A = saved[2], &B = saved[3], &C = saved[4],
                 &prev = saved[6];
    const Tensor seq_ids = saved[5].numel() ? saved[5] : Tensor();
    const Tensor D = saved[7].numel() ? saved[7] : Tensor();
    const bool has_init = ctx->saved_data["has_init"].toBool();
    const std::vector<Tensor> kept(saved.begin() + std::min(saved.size(), kSavedInputs), saved.end());
    const Prep p = prepare(x, dt, A, B, C, seq_ids, ctx->saved_data["chunk"].toInt(), &kept);
    const auto f32 = torch::kFloat32;
    const auto opt = x.options().dtype(p.cdt);
    const bool padded = p.Tp != p.T;
    auto alloc = [&](at::IntArrayRef sizes) {  // padded positions must read as zero
      return padded ? torch::zeros(sizes, opt) : torch::empty(sizes, opt);
    };

    Tensor dy = grads[0].defined() ? grads[0] : torch::zeros({p.Bsz, p.T, p.H, p.P}, x.options().dtype(f32));
    auto to_input = [&](const Tensor& t, const Tensor& like) {  // [B,nc,G,Lc,N] -> [B,T,G,N]
      return t.permute({0, 1, 3, 2, 4}).reshape({p.Bsz, p.Tp, p.G, p.N}).narrow(1, 0, p.T).to(like.scalar_type());
    };
    auto to_time = [&](const Tensor& t) {  // [B,nc,Lc,H] -> [B,T,H]
      return t.reshape({p.Bsz, p.Tp, p.H}).narrow(1, 0, p.T);
    };

    if (p.fused) {
      const auto in = chunk_inputs(p, x, dt, B, C, D);
      auto [dC_off, dH_off, dcum_E] = g_mask_kernels.chunk_bwd_off(in, dy, prev);
      auto [dS, ddec, dinit] = g_mask_kernels.states_backward(dH_off, p.dec, grads[1], prev);
      dH_off = Tensor();
      auto gr = g_mask_kernels.chunk_bwd_diag(in, dy, dS);
      auto dB_S = g_mask_kernels.chunk_bwd_db(in, dS);
      auto [dB, dC] = g_mask_kernels.chunk_cb_bwd(in, gr.dCB, dC_off, dB_S);
      auto g = g_mask_kernels.chunk_decay_grad(dcum_E, gr.dcum, gr.dLd, ddec, p.dec, gr.ddt_u, dt, A);
      return {gr.dx,
              g.ddt.to(dt.scalar_type()),
              g.dA.to(A.scalar_type()),
              dB,  // in x's dtype, which B and C share on this path
              dC,
              has_init ? dinit : Tensor(),
              Tensor(),
              D.defined() ? gr.dD : Tensor(),
              Tensor()};
    }
    auto E_t = per_row(p.E);

    // Incoming-state term y_off = E * (C . H_c), with dyE = dy * E (time-major, cdt).
    auto dyE = alloc({p.Bsz, p.nc, p.Lc, p.H, p.P});
    over_time(p, [&](int64_t c0, int64_t n, int64_t len) {
      auto out = chunk_part(dyE, c0, n, len);
      at::mul_out(out, time_part(dy, p, c0, n, len), chunk_part(E_t, c0, n, len));
    });
    auto dcum = dot_p(dyE, incoming_term(p, prev));  // d/d(cum) through E: [B,nc,H,Lc]
    auto dC = torch::empty({p.Bsz, p.nc, p.G, p.Lc, p.N}, x.options().dtype(f32));
    auto dH_off = torch::empty({p.Bsz, p.nc, p.H, p.P, p.N}, opt);
    for (int64_t g = 0; g < p.G; ++g) {
      auto dyE_g = group_cols(dyE, p, g);
      auto out = group_states(dH_off, p, g);
      at::bmm_out(out, dyE_g.transpose(1, 2), group_bc(p.Ct, p, g));
      dC.select(2, g).copy_(at::bmm(dyE_g, group_states(prev, p, g)).view({p.Bsz, p.nc, p.Lc, p.N}));
    }
    dyE = Tensor();

    // State passing, in reverse: dS_c = dL/dH_{c+1} (kept in cdt for the GEMMs).
    // With float32 inputs the running gradient lives in dS itself.
    Tensor dS, gs, ddec;
    if (g_mask_kernels.states_backward && dH_off.is_cuda()) {
      std::tie(dS, ddec, gs) = g_mask_kernels.states_backward(dH_off, p.dec, grads[1], prev);
      dH_off = Tensor();
    } else {
      dS = torch::empty({p.Bsz, p.nc, p.H, p.P, p.N}, opt);
      const bool in_place = p.cdt == f32;
      gs = in_place ? dS.select(1, p.nc - 1) : torch::empty({p.Bsz, p.H, p.P, p.N}, dcum.options());
      if (grads[1].defined()) gs.copy_(grads[1]); else gs.zero_();
      for (int64_t c = p.nc - 1; c >= 0; --c) {
        auto dec_c = p.dec.select(1, c).unsqueeze(-1).unsqueeze(-1);
        if (in_place) {
          auto next = c > 0 ? dS.select(1, c - 1) : torch::empty_like(gs);
          at::addcmul_out(next, dH_off.select(1, c), gs, dec_c);
          gs = next;
        } else {
          dS.select(1, c).copy_(gs);
          at::addcmul_out(gs, dH_off.select(1, c), gs, dec_c);
        }
      }
      dH_off = Tensor();
      // d/d(dec_c) = <dS_c, H_c>, all chunks at once (products in cdt, sums in float32).
      ddec = at::mul(dS, prev).sum({-1, -2}, false, f32);  // [B,nc,H]
    }
    auto dlast = ddec * p.dec;

    // Chunk states S_c = sum_s Ld_s u_s B_s^T: Q = B dS^T (time-major), du = Ld Q.
    auto Q = torch::empty({p.Bsz, p.nc, p.Lc, p.H, p.P}, opt);
    auto dB = torch::empty({p.Bsz, p.nc, p.G, p.Lc, p.N}, x.options().dtype(f32));
    {
      auto uL = make_uL(p);
      for (int64_t g = 0; g < p.G; ++g) {
        auto dS_g = group_states(dS, p, g);
        auto out = group_cols(Q, p, g);
        at::bmm_out(out, group_bc(p.Bt, p, g), dS_g.transpose(1, 2));
        dB.select(2, g).copy_(at::bmm(group_cols(uL, p, g), dS_g).view({p.Bsz, p.nc, p.Lc, p.N}));
      }
      auto dLd = dot_p(uL, Q);  // d/d(log Ld) = Ld * sum_p u Q
      dlast = dlast + dLd.sum(-1);
      dcum = dcum - dLd;
    }
    dS = Tensor();

    // Within-chunk term y = M u (head-major).
    Tensor du_diag, dM;
    {
      auto dyh = alloc({p.Bsz, p.nc, p.H, p.Lc, p.P});
      auto dyh_t = swap_hl(dyh);
      over_time(p, [&](int64_t c0, int64_t n, int64_t len) {
        chunk_part(dyh_t, c0, n, len).copy_(time_part(dy, p, c0, n, len));
      });
      auto dyh3 = dyh.view({-1, p.Lc, p.P});
      {
        auto M = build_M(p);
        du_diag = at::bmm(M.view({-1, p.Lc, p.Lc}).transpose(1, 2), dyh3)
                      .view({p.Bsz, p.nc, p.H, p.Lc, p.P});
      }
      auto u = make_u_heads(p);
      dM = at::bmm(dyh3, u.view({-1, p.Lc, p.P}).transpose(1, 2)).view({p.Bsz, p.nc, p.H, p.Lc, p.Lc});
    }
    auto [dCB, dcum_diag] = build_M_backward(p, dM);
    dM = Tensor();
    dcum = dcum + dcum_diag;
    dC.add_(torch::matmul(dCB, p.Bg32));
    dB.add_(torch::matmul(dCB.transpose(-1, -2), p.Cg32));
    dcum.select(-1, p.Lc - 1).add_(dlast);

    // du = Ld Q + M^T dy (time-major, cdt), then back to the inputs: u = dt x.
    auto du = torch::empty({p.Bsz, p.nc, p.Lc, p.H, p.P}, opt);
    at::addcmul_out(du, swap_hl(du_diag), Q, per_row(p.Ld));
    du_diag = Tensor();
    Q = Tensor();
    auto dx = torch::empty({p.Bsz, p.T, p.H, p.P}, x.options());
    over_time(p, [&](int64_t c0, int64_t n, int64_t len) {
      auto out = time_part(dx, p, c0, n, len);
      at::mul_out(out, chunk_part(du, c0, n, len), chunk_part(p.dtp, c0, n, len).unsqueeze(-1));
    });
    Tensor dD;
    if (D.defined()) {
      dx.add_(dy * D.unsqueeze(-1));
      dD = at::mul(dy, x).sum({0, 1, 3}, false, f32);
    }
    auto ddt_u = at::mul(du, p.xc).sum(-1, false, f32);  // [B,nc,Lc,H]
    du = Tensor();

    // cum = cumsum(A dt).
    auto da = (dcum.sum(-1, true) - dcum.cumsum(-1) + dcum).permute({0, 1, 3, 2});  // [B,nc,Lc,H]
    auto ddt = ddt_u + da * A.to(f32);
    auto dA = (da * p.dtp).sum({0, 1, 2});
    return {dx,
            to_time(ddt).to(dt.scalar_type()),
            dA.to(A.scalar_type()),
            to_input(dB, B),
            to_input(dC, C),
            has_init ? gs : Tensor(),
            Tensor(),
            dD,
            Tensor()};
  }
};

}  // namespace

void register_mask_kernels(MaskKernels kernels) { g_mask_kernels = std::move(kernels); }

SsdResult ssd_chunk_scan(const SsdArgs& a, int64_t chunk) {
  TORCH_CHECK(a.x.dim() == 4, "ssd_chunk_scan: x must be [B,T,H,P], got ", a.x.sizes());
  TORCH_CHECK(a.B.dim() == 4 && a.B.sizes().slice(0, 2) == a.x.sizes().slice(0, 2),
              "ssd_chunk_scan: B must be [B,T,G,N], got ", a.B.sizes());
  TORCH_CHECK(a.C.sizes() == a.B.sizes(), "ssd_chunk_scan: C must match B's shape");
  TORCH_CHECK(a.x.size(2) % a.B.size(2) == 0, "ssd_chunk_scan: heads must be a multiple of groups");
  Tensor dt, A;
  const auto raw_t = a.dt.scalar_type();
  const bool dt_kernel = raw_t == torch::kFloat32 || raw_t == torch::kHalf || raw_t == torch::kBFloat16;
  if (a.dt.is_cuda() && dt_kernel && g_mask_kernels.dt_prep) {
    std::tie(dt, A) = g_mask_kernels.dt_prep(a.dt, a.dt_bias, a.A_log, a.dt_min, a.dt_max);
  } else {
    dt = ssd_dt(a.dt, a.dt_bias, a.dt_min, a.dt_max).to(torch::kFloat32);
    A = -torch::exp(a.A_log.to(torch::kFloat32));
  }
  auto none = torch::empty({0}, a.x.options());
  auto out = SsdFunction::apply(a.x, dt, A, a.B, a.C, a.initial_state.defined() ? a.initial_state : none,
                                a.seq_ids.defined() ? a.seq_ids : none,
                                a.D.defined() ? a.D.to(torch::kFloat32) : none, chunk);
  return {out[0], out[1]};
}

}  // namespace peftfw::kernels::mamba2::fused
