// The second generation of the GPU training path's kernels, on by default: lora_down (the
// LoRA down projection with its dropout in one pass, peftfw/kernels/lora_down.hpp), the SSD
// chunk bookkeeping and log-decay gradient kernels (kernels/mamba2/cuda/ssd_prep.cu), and the
// chunk states fused with their recurrence (states_pass_kernel, kernels/mamba2/cuda/
// ssd_chunk.cu). They were written without a GPU and passed the GPU tests (LoraDownCuda,
// LoraCuda, SsdCuda/*.FusedWithV2KernelsEqualsReference) on an H100 on 2026-11-23.
// PEFTFW_V2_KERNELS=0 in the environment, or set_v2_kernels(false), takes the earlier path
// (the first-generation kernels and LibTorch compositions), for comparisons and bisecting.
#pragma once

namespace peftfw::kernels {

bool v2_kernels();
void set_v2_kernels(bool on);

}  // namespace peftfw::kernels
