#pragma once

#include "peftfw/plugin/architecture.hpp"

namespace peftfw::granite {

GgufLayout gguf_layout_of(const io::JsonConfig& json);

}  // namespace peftfw::granite
