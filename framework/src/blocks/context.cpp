// Positions within packed sequences and RoPE tables.
#include "peftfw/blocks/context.hpp"

#include <torch/torch.h>

namespace peftfw::blocks {

torch::Tensor positions_in_sequence(const torch::Tensor& seq_ids) {
  const int64_t T = seq_ids.size(1);
  auto t = torch::arange(T, seq_ids.options()).unsqueeze(0).expand_as(seq_ids);
  auto boundary = torch::ones_like(seq_ids, torch::kBool);
  if (T > 1)
    boundary.narrow(1, 1, T - 1).copy_(seq_ids.narrow(1, 1, T - 1).ne(seq_ids.narrow(1, 0, T - 1)));
  auto start = torch::where(boundary, t, torch::zeros_like(t));
  return t - std::get<0>(start.cummax(1));
}

std::pair<torch::Tensor, torch::Tensor> rope_tables(const torch::Tensor& positions,
                                                    const RopeOptions& rope, torch::Dtype dtype) {
  const int64_t d = rope.rotary_dim;
  auto idx = torch::arange(0, d, 2, positions.options().dtype(torch::kLong)).to(torch::kFloat32);
  auto inv_freq = 1.0 / torch::pow(rope.theta, idx / static_cast<double>(d));
  auto freqs = positions.to(torch::kFloat32).unsqueeze(-1) * inv_freq;  // [B,T,d/2]
  auto emb = torch::cat({freqs, freqs}, -1);
  return {emb.cos().to(dtype), emb.sin().to(dtype)};
}

}  // namespace peftfw::blocks
