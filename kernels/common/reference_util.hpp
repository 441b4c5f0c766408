// Helpers the LibTorch references of every kernel family share (private to kernels/).
#pragma once

#include <torch/torch.h>

#include <limits>
#include <vector>

namespace peftfw::kernels::reference_util {

// A sequence id no real sequence has: what shifted-in positions compare against.
inline constexpr int64_t kNoSequence = std::numeric_limits<int64_t>::min();

// Shifts a [B,T,...] tensor right by `shift` steps along T, filling with `fill`.
inline torch::Tensor shift_right(const torch::Tensor& t, int64_t shift, double fill) {
  namespace F = torch::nn::functional;
  const int64_t T = t.size(1);
  if (shift == 0) return t;
  std::vector<int64_t> pad(2 * (t.dim() - 1), 0);
  pad[pad.size() - 2] = shift;  // pad the front of dim 1
  return F::pad(t.narrow(1, 0, T - shift), F::PadFuncOptions(pad).value(fill));
}

}  // namespace peftfw::kernels::reference_util
