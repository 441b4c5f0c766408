// LoRA and DoRA on peftfw::nn::Linear, laid out exactly as HF PEFT's LoRA
// layers: lora_A [r, in] and lora_B [out, r] registered on the wrapped linear
// (so full names are PEFT's keys without a translation table), DoRA's
// lora_magnitude_vector [out] beside them.
#pragma once

#include <torch/torch.h>

#include "peftfw/nn/linear.hpp"

namespace peftfw::lora {

struct LoraOptions {
  int64_t r = 16;
  double alpha = 32.0;
  double dropout = 0.0;
  bool use_rslora = false;
  bool dora = false;
  bool float32_math = false;  // PEFT's behaviour; otherwise the base output's dtype
};

class LoraAdapter final : public nn::LinearAdapter {
 public:
  // Registers the adapter's parameters on `host` (float32, host's device) and attaches itself.
  static std::shared_ptr<LoraAdapter> attach(nn::LinearImpl& host, const LoraOptions& options);

  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& base_out,
                        const nn::LinearImpl& base) override;
  torch::Tensor forward_from_input(const torch::Tensor& x, const nn::LinearImpl& base) override;
  torch::Tensor merged_weight(const nn::LinearImpl& base) const override;

  double scaling() const { return scaling_; }

 private:
  LoraAdapter(const LoraOptions& options, torch::nn::Linear A, torch::nn::Linear B);
  // ||W + scaling * B A|| per output row, float32.
  torch::Tensor weight_norm(const nn::LinearImpl& base) const;

  LoraOptions options_;
  double scaling_;
  torch::nn::Linear A_, B_;
  torch::Tensor magnitude_;  // DoRA only
};

}  // namespace peftfw::lora
