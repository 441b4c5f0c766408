// The slots through which an adapter reaches inside an SSM mixer, as nn::LinearAdapter does for a
// projection:
// - a parameter slot: the mixer reads its SSM core tensors (A_log, D, and Mamba-2's dt_bias)
//   through SsmParameterAdapter::effective, so a method can train a delta or a sparse part of them;
// - a state slot: SsmStateAdapter gives a learned initial state (and conv window) that every
//   sequence starts from, and a learned offset added to the state the output reads at every step.
// Every path honours them: the reference and CUDA scans, packed sequence ids (each packed
// sequence starts from the learned state), left padding, prefill and decoding.
#pragma once

#include <torch/nn/module.h>
#include <torch/types.h>

#include <memory>
#include <string>
#include <vector>

namespace peftfw::blocks {

// The per-sequence state of a mixer and what its axes mean, for adapters and the inventory.
struct SsmStateLayout {
  std::vector<int64_t> shape;      // Mamba-1 [channel, state]; Mamba-2 [head, head_dim, state]
  std::vector<std::string> axes;   // e.g. {"channel", "state"}
  int64_t conv_channels = 0;       // the causal conv's channels (Mamba-2: x, B and C)
  int64_t conv_kernel = 0;
};

class SsmParameterAdapter {
 public:
  virtual ~SsmParameterAdapter();
  // The tensor the mixer computes with in place of `base` (the registered parameter of SSM group
  // `group`: "A_log", "D" or "dt_bias"), e.g. base + a sparse delta. Return base to leave it.
  virtual torch::Tensor effective(const std::string& group, const torch::Tensor& base) const = 0;
};

// What a state adapter contributes; each tensor may be undefined (none).
struct SsmStateTerms {
  torch::Tensor initial_state;  // SsmStateLayout::shape: the state before each sequence's first token
  torch::Tensor initial_conv;   // [conv_channels, conv_kernel - 1]: the conv inputs before it
  torch::Tensor state_offset;   // SsmStateLayout::shape: y reads C (h_t + offset) at every step
  torch::Tensor output_offset;  // the state shape without "state": y + offset at every step
};

class SsmStateAdapter {
 public:
  virtual ~SsmStateAdapter();
  virtual SsmStateTerms terms() const = 0;
};

// Implemented by the Mamba-1 and Mamba-2 mixers.
class SsmMixer {
 public:
  virtual ~SsmMixer();
  virtual SsmStateLayout state_layout() const = 0;
  // The SSM core groups the parameter slot serves on this mixer.
  virtual std::vector<std::string> slot_groups() const = 0;
  // What each axis of an SSM core tensor indexes, by parameter path relative to the mixer
  // ("A_log", "dt_proj.bias"); empty for a path it does not know.
  virtual std::vector<std::string> axes_of(const std::string& path) const = 0;

  void set_parameter_adapter(std::shared_ptr<SsmParameterAdapter> a) { param_adapter_ = std::move(a); }
  void set_state_adapter(std::shared_ptr<SsmStateAdapter> a) { state_adapter_ = std::move(a); }
  SsmParameterAdapter* parameter_adapter() const { return param_adapter_.get(); }
  SsmStateAdapter* state_adapter() const { return state_adapter_.get(); }

 protected:
  torch::Tensor slot(const std::string& group, const torch::Tensor& base) const {
    return param_adapter_ ? param_adapter_->effective(group, base) : base;
  }
  SsmStateTerms state_terms() const { return state_adapter_ ? state_adapter_->terms() : SsmStateTerms{}; }

 private:
  std::shared_ptr<SsmParameterAdapter> param_adapter_;
  std::shared_ptr<SsmStateAdapter> state_adapter_;
};

// Every SSM mixer under `root`, with its full dotted name and its module (to register an
// adapter's parameters on), in module order.
struct NamedSsmMixer {
  std::string name;
  SsmMixer* mixer;
  torch::nn::Module* module;
};
std::vector<NamedSsmMixer> named_ssm_mixers(torch::nn::Module& root);

// ---- The math the mixers use for the state terms (plain LibTorch ops, differentiable). ----

// Where sequences start in a [B,T] batch: at t = 0 and wherever seq_ids changes, or, with a
// padding mask (1 = token, 0 = pad) and no ids, at the first token after pads. Either may be
// undefined (then only t = 0 starts).
struct SequenceStarts {
  torch::Tensor started;  // bool [B,T]: a sequence has started at or before t (false on left pads)
  torch::Tensor offset;   // int64 [B,T]: t minus the start of t's sequence
};
SequenceStarts sequence_starts(int64_t batch, int64_t length, const torch::Tensor& seq_ids,
                               const torch::Tensor& ssm_mask, const torch::Device& device);

// What the state terms of one forward need: h0 is added by linearity when rows are packed or
// padded (else the scan starts from it), and sequence starts are found when h0 is added so or a
// conv window is learned.
struct StateTermContext {
  bool by_linearity = false;
  SequenceStarts starts;  // undefined tensors when no term needs them
};
StateTermContext state_term_context(const SsmStateTerms& terms, int64_t batch, int64_t length,
                                    const torch::Tensor& seq_ids, const torch::Tensor& ssm_mask,
                                    const torch::Device& device);

// A mixer's causal depthwise conv and SiLU of x [B,T,C] (weight [C,K], bias in x's dtype; packed
// rows kept apart by seq_ids), with the learned window's share added to the pre-activation of each
// sequence's first K-1 positions when `terms` has one.
torch::Tensor conv_silu_with_terms(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                                   const torch::Tensor& seq_ids, const SsmStateTerms& terms,
                                   const SequenceStarts& starts);

// Sum of dt over t's sequence up to and including t ([B,T,X] float32, dt >= 0), zero where no
// sequence has started: the decay a state carried into the sequence has undergone is exp(A * it).
torch::Tensor sequence_dt_sums(const torch::Tensor& dt, const SequenceStarts& starts);

// The conv pre-activation added at the first K-1 positions of each sequence by learned inputs
// `window` [C, K-1] before it (in place of zeros), for a depthwise conv weight [C, K]:
// [B,T,C] float32.
torch::Tensor conv_window_term(const torch::Tensor& window, const torch::Tensor& weight,
                               const SequenceStarts& starts);

// The conv cache a prefill leaves ([B,C,K]: the last K conv inputs of `inputs` [B,T,C]) when
// learned inputs `window` [C, K-1] precede each sequence: positions before the last sequence's
// start hold the window (or zero further back) instead of pads or another sequence's inputs.
torch::Tensor conv_cache_with_window(const torch::Tensor& inputs, const torch::Tensor& window,
                                     const SequenceStarts& starts, int64_t kernel);

}  // namespace peftfw::blocks
