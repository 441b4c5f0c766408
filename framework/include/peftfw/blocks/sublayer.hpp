// A sublayer: what a decoder layer applies between a norm and a residual add
// (a sequence mixer such as Mamba-2 or attention, or a feed-forward such as an
// MLP or a mixture of experts).
#pragma once

#include "peftfw/blocks/context.hpp"
#include "peftfw/blocks/module.hpp"

namespace peftfw::blocks {

class SublayerImpl : public BlockImpl {
 public:
  // x [B,T,hidden] (already normalised) -> [B,T,hidden]. `cache` is null without a cache.
  virtual torch::Tensor forward(const torch::Tensor& x, const ForwardContext& ctx, LayerCache* cache) = 0;
  // The name of what it is in a layer kind ("mamba", "attention", "mlp", "moe").
  virtual std::string part() const = 0;
};

}  // namespace peftfw::blocks
