// Human-readable reports about a model inventory (`peftfw plan`).
#pragma once

#include <string>

#include "peftfw/model/inventory.hpp"

namespace peftfw {

// Thousands separators: 3191396096 -> "3,191,396,096".
std::string with_commas(int64_t n);

// Module inventory per layer kind, SSM groups and the total parameter count.
std::string inventory_report(const ModelInventory& inventory);

}  // namespace peftfw
