// The fast chunked SSD scan (ssd_fused.cpp): one autograd node with a
// hand-written backward. Runs on any device; on CUDA the two elementwise
// passes over the decay matrices use kernels registered by the CUDA build.
#pragma once

#include <torch/types.h>

#include <functional>
#include <utility>

#include "peftfw/kernels/mamba2.hpp"

namespace peftfw::kernels::mamba2::fused {

// The chunk length the fast path uses. The result does not depend on it
// (up to rounding); 128 balances the [Lc,Lc] decay matrices against the
// number of chunk states kept for backward.
constexpr int64_t kDefaultChunk = 128;

SsdResult ssd_chunk_scan(const SsdArgs& args, int64_t chunk = kDefaultChunk);

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
};
void register_mask_kernels(MaskKernels kernels);

}  // namespace peftfw::kernels::mamba2::fused
