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

// Under kNarrowProjections, the outputs of the other (wider) frozen projections are kept too
// while the ones kept and not yet taken back hold at most `bytes` (0: none). Unlike the
// narrow ones, which of their calls keep depends on the room left, so both runs ask:
// may_keep_wide() says whether a call is eligible; in the first run keep_output_if_room()
// keeps the output or records that it did not, and in the rerun take_kept_output() returns
// it or an undefined tensor (recompute).
void set_wide_keep_budget(int64_t bytes);
bool may_keep_wide(int64_t in_features, int64_t out_features);
void keep_output_if_room(const torch::Tensor& out);

// The two rules together, for a frozen projection from in_features to out_features: whether
// its output may be kept (by shape, or within the budget), and keeping it in a first run by
// the rule that applies.
bool may_keep(int64_t in_features, int64_t out_features);
void keep_projection_output(int64_t in_features, int64_t out_features, const torch::Tensor& out);

// For an op that keeps its output: in the rerun, the output it computed in the first run
// (undefined otherwise; ops must ask in the same order in both runs, which holds when the
// decision depends only on shapes). The op says what it computes, `rows` x `cols` (any
// leading shape, last dimension cols); a kept output of another shape is an error (the two
// runs took different paths). In the first run, keep_output() stores it; elsewhere both
// are no-ops.
torch::Tensor take_kept_output(int64_t rows, int64_t cols);
void keep_output(const torch::Tensor& out);

// Running totals (this process) of outputs kept in first runs and taken back in reruns.
struct KeepStats {
  int64_t kept = 0, taken = 0;  // taken counts only outputs actually handed back
};
KeepStats keep_stats();

}  // namespace peftfw::nn
