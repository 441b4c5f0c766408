// GraniteMoeHybridForCausalLM wired from blocks (torchtune-style builder).
#pragma once

#include <memory>

#include "config.hpp"
#include "peftfw/blocks/decoder.hpp"

namespace peftfw::granite {

std::shared_ptr<blocks::HybridLM> build_granite(const GraniteConfig& c);

}  // namespace peftfw::granite
