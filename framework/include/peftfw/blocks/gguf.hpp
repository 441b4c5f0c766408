// GGUF layouts derived from a block-built model's inventory: llama.cpp names
// each tensor by the role of the block part it comes from (ssm_in, attn_q,
// ffn_gate, ...), so a plugin gives only the arch name and its hyperparameter
// keys. The layout changes follow llama.cpp's convert_hf_to_gguf.py:
// A stored as -exp(A_log) ([H,1] for Mamba-2, [inner, state] for Mamba-1), D as [H,1] (Mamba-1:
// [inner]), conv1d squeezed to [C,K], stacked experts' gate_up split in halves, the
// gated-norm weight as [G, inner/G], fused gate/up split in halves, and q/k
// rows permuted into ggml's RoPE pair order.
#pragma once

#include <string>

#include "peftfw/model/inventory.hpp"
#include "peftfw/plugin/architecture.hpp"

namespace peftfw::blocks {

struct GgufNames {
  int64_t ssm_groups = 1;  // the gated norm is stored per group: [G, inner/G]
  // Mamba-2 stores A and D as columns [H, 1]; Mamba-1 keeps A [inner, state] and D [inner].
  bool ssm_columns = true;
  int64_t head_dim = 0;    // with rotary_dim > 0: q/k rows are permuted for ggml's RoPE
  int64_t rotary_dim = 0;
  // An MLP in a layer that also holds a MoE is the shared expert: ffn_*_shexp.
  std::string shared_expert_suffix = "_shexp";
};

class GgufBuilder {
 public:
  explicit GgufBuilder(std::string arch);
  // Keys are written as "<arch>.<key>".
  void u32(const std::string& key, int64_t value);
  void f32(const std::string& key, double value);
  void boolean(const std::string& key, bool value);
  void i32_array(const std::string& key, std::vector<int32_t> values);
  // Every tensor of the inventory under its llama.cpp name. Throws InputError for a part
  // llama.cpp has no tensor for.
  void tensors(const ModelInventory& inv, const GgufNames& names);
  GgufLayout layout() const { return layout_; }

 private:
  GgufLayout layout_;
};

}  // namespace peftfw::blocks
