// GraniteMoeHybrid module inventory (from config only, no tensors).
#pragma once

#include "config.hpp"
#include "peftfw/model/inventory.hpp"

namespace peftfw::granite {
ModelInventory describe_granite(const GraniteConfig& config);
}
