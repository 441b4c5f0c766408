// Activation checkpointing: run `fn(input)` without keeping its activations,
// and run it again during backward (the "reentrant" scheme of
// torch.utils.checkpoint). The random-number state is saved and restored for
// the rerun, so dropout masks are the same both times.
#pragma once

#include <torch/types.h>

#include <functional>

namespace peftfw::nn {

using CheckpointFn = std::function<torch::Tensor(const torch::Tensor&)>;

// Only checkpoints when grad mode is on; otherwise it is fn(input).
torch::Tensor checkpoint(CheckpointFn fn, const torch::Tensor& input);

// Selective recomputation: which op outputs survive from a checkpointed function's first
// run to its rerun in backward, so that the rerun skips those ops (the memory they hold
// buys the time of computing them again).
enum class KeepPolicy {
  kNone,                // recompute everything (plain activation checkpointing)
  kNarrowProjections,   // keep the outputs of frozen projections at most half as wide as
                        // their input (Mamba out_proj, the MLP's output_linear): about a third
                        // of the recomputed matrix work for 2 x out_features bytes a token each
};
void set_keep_policy(KeepPolicy policy);
KeepPolicy keep_policy();

// Whether a frozen projection from in_features to out_features is kept under the policy.
bool keeps_projection(int64_t in_features, int64_t out_features);

// For an op that keeps its output: in the rerun, the output it computed in the first run
// (undefined otherwise; ops must ask in the same order in both runs, which holds when the
// decision depends only on shapes). In the first run, keep_output() stores it; elsewhere
// both are no-ops.
torch::Tensor take_kept_output();
void keep_output(const torch::Tensor& out);

// Running totals (this process) of outputs kept in first runs and taken back in reruns.
struct KeepStats {
  int64_t kept = 0, taken = 0;
};
KeepStats keep_stats();

}  // namespace peftfw::nn
