// The fast chunked SSD scan (ssd_fused.cpp): one autograd node with a
// hand-written backward. Runs on any device; on CUDA it uses the kernels the CUDA
// build registers (register_mask_kernels, from the family's dispatch on first use):
// the per-chunk kernels where they cover the shapes, else the elementwise passes over
// the decay matrices and the chunk-state recurrence.
#pragma once

#include <torch/types.h>

#include <functional>
#include <tuple>
#include <utility>

#include "peftfw/kernels/mamba2.hpp"

namespace peftfw::kernels::mamba2::fused {

// The chunk length the fast path uses. The result does not depend on it
// (up to rounding); 128 balances the [Lc,Lc] decay matrices against the
// number of chunk states kept for backward.
constexpr int64_t kDefaultChunk = 128;

SsdResult ssd_chunk_scan(const SsdArgs& args, int64_t chunk = kDefaultChunk);

// Inputs of the fused per-chunk kernels (chunk length 128). x [B,T,H,P] and
// B, C [B,T,G,N] in one 16-bit dtype; dt [B,T,H] float32 after softplus;
// D [H] float32 or undefined; the rest as prepared in ssd_fused.cpp.
struct ChunkInputs {
  torch::Tensor x, dt, B, C, D;
  torch::Tensor cum, seg, CB, Ld, E;
  int64_t nc = 0;
};
struct ChunkGrads {
  torch::Tensor dx, ddt_u, dcum, dLd, dCB, dD;
};
// The per-chunk bookkeeping of the fused path (see ssd_fused.cpp's Prep).
struct ChunkPrep {
  torch::Tensor seg, cum, Ld, E, dec;
};
// The log-decay chain of its backward: ddt [B,T,H] and dA [H], float32.
struct DecayGrads {
  torch::Tensor ddt, dA;
};

struct MaskKernels {
  // (CB [B,nc,G,Lc,Lc] f32, cum [B,nc,H,Lc] f32, seg [B,nc,Lc] i32, heads per group, out dtype)
  //   -> M [B,nc,H,Lc,Lc]
  std::function<torch::Tensor(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                              int64_t, torch::ScalarType)>
      build;
  // (dM [B,nc,H,Lc,Lc], CB, cum, seg, heads per group) -> (dCB [B,nc,G,Lc,Lc] f32, dcum [B,nc,H,Lc] f32)
  std::function<std::pair<torch::Tensor, torch::Tensor>(const torch::Tensor&, const torch::Tensor&,
                                                        const torch::Tensor&, const torch::Tensor&,
                                                        int64_t)>
      backward;
  // The chunk-state recurrence (the path without the per-chunk kernels): (S [B,nc,H,P,N],
  // dec [B,nc,H] f32, init [B,H,P,N] f32 or undefined) -> (prev [B,nc,H,P,N] in S's dtype,
  // final [B,H,P,N] f32)
  std::function<std::pair<torch::Tensor, torch::Tensor>(const torch::Tensor&, const torch::Tensor&,
                                                        const torch::Tensor&)>
      states;
  // Its backward, on both paths: (dH_off, dec, dfinal or undefined, prev) -> (dS, ddec [B,nc,H] f32,
  // dinit f32)
  std::function<std::tuple<torch::Tensor, torch::Tensor, torch::Tensor>(
      const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, const torch::Tensor&)>
      states_backward;

  // Fused per-chunk kernels (cuda/ssd_chunk.hpp). chunk_supported(x, B): whether they cover
  // these shapes and dtypes; the others compute y (incl. D x), the incoming-state backward
  // (dC's part from it [B,nc,G,Lc,N] f32, dH_off, dcum_E), the within-chunk backward, and dB's
  // part through the chunk states (inputs, dS) -> [B,nc,G,Lc,N] f32.
  std::function<bool(const torch::Tensor&, const torch::Tensor&)> chunk_supported;
  std::function<torch::Tensor(const ChunkInputs&, const torch::Tensor&)> chunk_scan;
  std::function<std::tuple<torch::Tensor, torch::Tensor, torch::Tensor>(const ChunkInputs&, const torch::Tensor&,
                                                                        const torch::Tensor&)>
      chunk_bwd_off;
  std::function<ChunkGrads(const ChunkInputs&, const torch::Tensor&, const torch::Tensor&)> chunk_bwd_diag;
  std::function<torch::Tensor(const ChunkInputs&, const torch::Tensor&)> chunk_bwd_db;
  // C.B per chunk and group: (inputs; CB unused) -> CB [B,nc,G,Lc,Lc] f32;
  // and its backward with the cross-head parts added: (inputs, dCB, dC_off, dB_S) -> (dB, dC)
  // [B,T,G,N] in x's dtype.
  std::function<torch::Tensor(const ChunkInputs&)> chunk_cb;
  std::function<std::pair<torch::Tensor, torch::Tensor>(const ChunkInputs&, const torch::Tensor&, const torch::Tensor&,
                                                        const torch::Tensor&)>
      chunk_cb_bwd;

  // The fused path's bookkeeping kernels (cuda/ssd_prep.hpp):
  // (dt [B,T,H] f32, A [H] f32, seq_ids [B,T] or undefined, nc) -> the chunk bookkeeping;
  std::function<ChunkPrep(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, int64_t)> chunk_prep;
  // (dcum_E, dcum_diag, dLd [B,nc,H,Lc], ddec, dec [B,nc,H], ddt_u [B,nc,H,Lc], dt [B,T,H], A [H]).
  std::function<DecayGrads(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                           const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, const torch::Tensor&)>
      chunk_decay_grad;
  // The chunk states and their recurrence in one kernel: (inputs, dec [B,nc,H] f32, init
  // [B,H,P,N] or undefined) -> (prev [B,nc,H,P,N] in x's dtype, final [B,H,P,N] f32).
  std::function<std::pair<torch::Tensor, torch::Tensor>(const ChunkInputs&, const torch::Tensor&, const torch::Tensor&)>
      chunk_states_pass;
  // dt and A for CUDA inputs (cuda/ssd_prep.hpp): (raw dt [B,T,H], dt_bias [H], A_log [H], dt_min,
  // dt_max) -> (dt [B,T,H] f32 = ssd_dt(...), A [H] f32 = -exp(A_log)), differentiable in the
  // three tensors.
  std::function<std::pair<torch::Tensor, torch::Tensor>(const torch::Tensor&, const torch::Tensor&,
                                                        const torch::Tensor&, double, double)>
      dt_prep;
};
void register_mask_kernels(MaskKernels kernels);

}  // namespace peftfw::kernels::mamba2::fused
