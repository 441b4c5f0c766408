// The state-term math of peftfw/blocks/ssm_slots.hpp.
#include "peftfw/blocks/ssm_slots.hpp"

#include <torch/torch.h>

#include "peftfw/kernels/ops.hpp"

namespace peftfw::blocks {

SsmParameterAdapter::~SsmParameterAdapter() = default;
SsmStateAdapter::~SsmStateAdapter() = default;
SsmMixer::~SsmMixer() = default;

std::vector<NamedSsmMixer> named_ssm_mixers(torch::nn::Module& root) {
  std::vector<NamedSsmMixer> out;
  for (const auto& item : root.named_modules())
    if (auto* mixer = dynamic_cast<SsmMixer*>(item.value().get()))
      out.push_back({item.key(), mixer, item.value().get()});
  return out;
}

SequenceStarts sequence_starts(int64_t batch, int64_t length, const torch::Tensor& seq_ids,
                               const torch::Tensor& ssm_mask, const torch::Device& device) {
  auto start = torch::zeros({batch, length}, torch::TensorOptions().dtype(torch::kBool).device(device));
  if (seq_ids.defined()) {
    start.select(1, 0).fill_(true);
    if (length > 1)
      start.narrow(1, 1, length - 1).copy_(seq_ids.narrow(1, 1, length - 1) != seq_ids.narrow(1, 0, length - 1));
  } else if (ssm_mask.defined()) {
    auto token = ssm_mask.to(device) > 0.5;
    start.copy_(token);
    if (length > 1) start.narrow(1, 1, length - 1).logical_and_(token.narrow(1, 0, length - 1).logical_not());
  } else {
    start.select(1, 0).fill_(true);
  }
  auto t = torch::arange(length, torch::TensorOptions().dtype(torch::kLong).device(device)).expand({batch, length});
  // The latest start at or before t (-1 before any).
  auto last = std::get<0>(torch::where(start, t, torch::full_like(t, -1)).cummax(1));
  SequenceStarts out;
  out.started = last >= 0;
  out.offset = torch::where(out.started, t - last, torch::zeros_like(t));
  return out;
}

StateTermContext state_term_context(const SsmStateTerms& terms, int64_t batch, int64_t length,
                                    const torch::Tensor& seq_ids, const torch::Tensor& ssm_mask,
                                    const torch::Device& device) {
  StateTermContext c;
  c.by_linearity = seq_ids.defined() || ssm_mask.defined();
  if (terms.initial_conv.defined() || (terms.initial_state.defined() && c.by_linearity))
    c.starts = sequence_starts(batch, length, seq_ids, ssm_mask, device);
  return c;
}

torch::Tensor conv_silu_with_terms(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                                   const torch::Tensor& seq_ids, const SsmStateTerms& terms,
                                   const SequenceStarts& starts) {
  if (!terms.initial_conv.defined()) return kernels::causal_conv1d(x, weight, bias, seq_ids, /*silu=*/true);
  auto pre = kernels::causal_conv1d(x, weight, bias, seq_ids, /*silu=*/false);
  pre = pre.to(torch::kFloat32) + conv_window_term(terms.initial_conv.to(torch::kFloat32), weight, starts);
  return torch::silu(pre.to(x.scalar_type()));
}

torch::Tensor sequence_dt_sums(const torch::Tensor& dt, const SequenceStarts& starts) {
  auto inclusive = dt.cumsum(1);
  auto exclusive = inclusive - dt;
  const int64_t T = dt.size(1);
  auto t = torch::arange(T, starts.offset.options()).expand_as(starts.offset);
  auto start_pos = (t - starts.offset).unsqueeze(-1).expand(dt.sizes());
  auto sums = inclusive - exclusive.gather(1, start_pos);
  return sums * starts.started.unsqueeze(-1).to(sums.scalar_type());
}

torch::Tensor conv_window_term(const torch::Tensor& window, const torch::Tensor& weight,
                               const SequenceStarts& starts) {
  const int64_t B = starts.offset.size(0), T = starts.offset.size(1);
  const int64_t C = weight.size(0), K = weight.size(-1);
  auto w = weight.reshape({C, K}).to(window.scalar_type());
  if (K < 2) return torch::zeros({B, T, C}, window.options());
  // c[j] = sum_{k <= K-2-j} w[:, k] * window[:, j+k]: what the learned inputs add at offset j.
  std::vector<torch::Tensor> rows;
  for (int64_t j = 0; j < K - 1; ++j)
    rows.push_back((w.narrow(1, 0, K - 1 - j) * window.narrow(1, j, K - 1 - j)).sum(1));
  auto table = torch::stack(rows);  // [K-1, C]
  auto valid = starts.started.logical_and(starts.offset < K - 1);
  auto index = starts.offset.clamp_max(K - 2).reshape({-1});
  auto term = table.index_select(0, index).reshape({B, T, C});
  return term * valid.unsqueeze(-1).to(term.scalar_type());
}

torch::Tensor conv_cache_with_window(const torch::Tensor& inputs, const torch::Tensor& window,
                                     const SequenceStarts& starts, int64_t kernel) {
  const int64_t B = inputs.size(0), T = inputs.size(1), C = inputs.size(2), K = kernel;
  auto last_start = (T - 1) - starts.offset.select(1, T - 1);  // [B]
  auto w = window.to(inputs.scalar_type());
  std::vector<torch::Tensor> cols;
  for (int64_t i = 0; i < K; ++i) {
    const int64_t pos = T - K + i;
    auto given = pos >= 0 ? inputs.select(1, pos) : torch::zeros({B, C}, inputs.options());
    auto before = last_start > pos;                // [B]: ahead of the sequence
    auto v = (K - 1) + pos - last_start;           // its index in the window
    auto from_window = K > 1 ? w.index_select(1, v.clamp(0, K - 2)).t() : torch::zeros({B, C}, inputs.options());
    auto in_window = before.logical_and(v >= 0).unsqueeze(-1);
    cols.push_back(torch::where(in_window, from_window,
                                torch::where(before.unsqueeze(-1), torch::zeros_like(given), given)));
  }
  return torch::stack(cols, 2);  // [B,C,K]
}

}  // namespace peftfw::blocks
