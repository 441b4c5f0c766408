// Kernels written on a machine without a GPU and not yet run on one. They are compiled
// everywhere (nvcc compile-checks them on CI) and covered by GPU tests, but the model and
// adapter code only takes them when PEFTFW_PENDING_KERNELS=1 is in the environment (or
// after set_pending_kernels(true)), until those tests have passed on a GPU and the default
// is switched. Today: lora_down (peftfw/kernels/lora_down.hpp); the SSD chunk bookkeeping
// and log-decay gradient kernels (kernels/mamba2/cuda/ssd_prep.cu); the chunk states fused
// with their recurrence (states_pass_kernel in kernels/mamba2/cuda/ssd_chunk.cu).
#pragma once

namespace peftfw::kernels {

bool pending_kernels();
void set_pending_kernels(bool on);

}  // namespace peftfw::kernels
