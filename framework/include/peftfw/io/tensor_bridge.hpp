// The torch side of checkpoint I/O: TensorView -> at::Tensor and back.
//
// This is the only LibTorch-dependent part of peftfw/io; safetensors.hpp stays
// torch-free so the format code builds and tests without LibTorch. at::Tensor
// is only forward-declared here; callers include torch themselves.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "peftfw/io/safetensors.hpp"

namespace at {
class Tensor;
}  // namespace at

namespace peftfw::io {

// A new CPU tensor holding a copy of the view's bytes, with the matching dtype
// (BF16 -> kBFloat16, BOOL -> kBool, ...). `what` names the tensor in errors,
// e.g. "model.safetensors: tensor 'x'"; a BOOL byte other than 0 or 1 is an
// InputError (torch's bool would silently misbehave).
at::Tensor to_tensor(const TensorView& view, const std::string& what);

// Whether a stored type may fill a floating-point parameter: F64, F32, F16, BF16.
bool is_floating_point(DType dtype);

// The tensor's dtype as PyTorch prints it ("float32", "bfloat16", "int64"), for messages.
std::string dtype_label(const at::Tensor& tensor);

// NaN and infinite elements of a tensor (zero for integer and bool tensors).
struct NonFiniteCount {
  int64_t nan = 0;
  int64_t inf = 0;    // +Inf and -Inf
  int64_t numel = 0;  // elements of the tensor
  bool any() const { return nan + inf > 0; }
};

// One pass (isfinite().all()) when every element is finite; the counts take
// two more passes only when something is wrong.
NonFiniteCount count_non_finite(const at::Tensor& tensor);

// "3 NaN and 1 Inf among 4096 values", for messages.
std::string describe_non_finite(const NonFiniteCount& count);

// to_tensor for a tensor that fills a floating-point parameter (a model weight,
// an adapter matrix, an SSM tensor). InputError naming `what` when the file
// stores an integer or BOOL type (torch's copy_ would cast it silently; the
// message gives the type found and `expected`, e.g. "float32") or when an
// element is NaN or infinite (with the counts).
at::Tensor to_float_tensor(const TensorView& view, const std::string& what,
                           const std::string& expected);

// The tensor as bytes for write_safetensors: detached, on CPU, contiguous
// (copied only when it is not already). The returned entry keeps that tensor
// alive through NamedTensorBytes::owner. Dtypes outside DType (complex,
// uint16, float8, ...) are an InputError naming `name`.
NamedTensorBytes tensor_bytes(const std::string& name, const at::Tensor& tensor);

// Every tensor of a checkpoint (folder, .safetensors file or index; see
// Checkpoint::open), copied into CPU tensors.
std::map<std::string, at::Tensor> load_checkpoint_tensors(const std::string& path);

// One safetensors file, atomically (see write_safetensors).
void save_tensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                  const std::map<std::string, std::string>& metadata = {});

// A checkpoint folder, sharded like transformers (see write_checkpoint).
// Tensors are packed in name order.
std::vector<std::string> save_checkpoint_tensors(
    const std::string& folder, const std::map<std::string, at::Tensor>& tensors,
    const std::map<std::string, std::string>& metadata = {},
    uint64_t max_shard_bytes = kDefaultMaxShardBytes);

}  // namespace peftfw::io
