// TensorView <-> at::Tensor conversion and whole-checkpoint load/save.
#include "peftfw/io/tensor_bridge.hpp"

#include <cstring>
#include <memory>

#include <torch/torch.h>

#include "peftfw/error.hpp"

// safetensors data is little-endian; we hand the bytes to torch unchanged.
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "peftfw tensor_bridge assumes a little-endian host"
#endif

namespace peftfw::io {
namespace {

c10::ScalarType scalar_type(DType dtype) {
  switch (dtype) {
    case DType::F64:
      return torch::kFloat64;
    case DType::F32:
      return torch::kFloat32;
    case DType::F16:
      return torch::kFloat16;
    case DType::BF16:
      return torch::kBFloat16;
    case DType::I64:
      return torch::kInt64;
    case DType::I32:
      return torch::kInt32;
    case DType::I16:
      return torch::kInt16;
    case DType::I8:
      return torch::kInt8;
    case DType::U8:
      return torch::kUInt8;
    case DType::BOOL:
      return torch::kBool;
  }
  throw std::logic_error("peftfw::io: DType value out of range");
}

std::optional<DType> dtype_of(c10::ScalarType type) {
  switch (type) {
    case torch::kFloat64:
      return DType::F64;
    case torch::kFloat32:
      return DType::F32;
    case torch::kFloat16:
      return DType::F16;
    case torch::kBFloat16:
      return DType::BF16;
    case torch::kInt64:
      return DType::I64;
    case torch::kInt32:
      return DType::I32;
    case torch::kInt16:
      return DType::I16;
    case torch::kInt8:
      return DType::I8;
    case torch::kUInt8:
      return DType::U8;
    case torch::kBool:
      return DType::BOOL;
    default:
      return std::nullopt;
  }
}

}  // namespace

at::Tensor to_tensor(const TensorView& view, const std::string& what) {
  if (view.dtype == DType::BOOL) {
    for (std::size_t i = 0; i < view.nbytes; ++i) {
      if (view.data[i] > 1) {
        throw InputError(what + ": BOOL element " + std::to_string(i) + " has byte value " +
                         std::to_string(view.data[i]) + ", expected 0 or 1");
      }
    }
  }
  at::Tensor out = torch::empty(view.shape, torch::TensorOptions().dtype(scalar_type(view.dtype)));
  TORCH_INTERNAL_ASSERT(static_cast<std::size_t>(out.nbytes()) == view.nbytes,
                        "view byte count disagrees with its shape");
  if (view.nbytes > 0) std::memcpy(out.data_ptr(), view.data, view.nbytes);
  return out;
}

bool is_floating_point(DType dtype) {
  return dtype == DType::F64 || dtype == DType::F32 || dtype == DType::F16 || dtype == DType::BF16;
}

std::string dtype_label(const at::Tensor& tensor) {
  switch (tensor.scalar_type()) {
    case torch::kFloat64:
      return "float64";
    case torch::kFloat32:
      return "float32";
    case torch::kFloat16:
      return "float16";
    case torch::kBFloat16:
      return "bfloat16";
    case torch::kInt64:
      return "int64";
    case torch::kInt32:
      return "int32";
    case torch::kInt16:
      return "int16";
    case torch::kInt8:
      return "int8";
    case torch::kUInt8:
      return "uint8";
    case torch::kBool:
      return "bool";
    default:
      return c10::toString(tensor.scalar_type());
  }
}

NonFiniteCount count_non_finite(const at::Tensor& tensor) {
  NonFiniteCount out;
  out.numel = tensor.numel();
  if (!tensor.is_floating_point() || out.numel == 0) return out;
  if (torch::isfinite(tensor).all().item<bool>()) return out;
  out.nan = torch::isnan(tensor).sum().item<int64_t>();
  out.inf = torch::isinf(tensor).sum().item<int64_t>();
  return out;
}

std::string describe_non_finite(const NonFiniteCount& count) {
  return std::to_string(count.nan) + " NaN and " + std::to_string(count.inf) + " Inf among " +
         std::to_string(count.numel) + " values";
}

at::Tensor to_float_tensor(const TensorView& view, const std::string& what,
                           const std::string& expected) {
  if (!is_floating_point(view.dtype)) {
    throw InputError(what + ": stored as " + dtype_name(view.dtype) +
                     ", expected a floating-point type (F32, BF16, F16 or F64) for this " +
                     expected +
                     " parameter; an integer tensor here is a conversion or export bug, not "
                     "weights (re-export the file with float tensors)");
  }
  at::Tensor out = to_tensor(view, what);
  const auto bad = count_non_finite(out);
  if (bad.any()) {
    throw InputError(what + ": " + describe_non_finite(bad) +
                     "; a model with non-finite weights computes NaN. The file is damaged or was "
                     "saved after training diverged: use an earlier or re-exported copy");
  }
  return out;
}

NamedTensorBytes tensor_bytes(const std::string& name, const at::Tensor& tensor) {
  if (!tensor.defined()) {
    throw InputError("cannot save tensor '" + name + "': it is undefined");
  }
  if (tensor.layout() != torch::kStrided) {
    throw InputError("cannot save tensor '" + name + "': only dense (strided) tensors can be " +
                     "saved, found layout " + c10::str(tensor.layout()));
  }
  const auto dtype = dtype_of(tensor.scalar_type());
  if (!dtype) {
    throw InputError("cannot save tensor '" + name + "': dtype " +
                     std::string(c10::toString(tensor.scalar_type())) +
                     " has no safetensors type peftfw writes (supported: " +
                     supported_dtype_names() + ")");
  }
  auto cpu = std::make_shared<at::Tensor>(tensor.detach().to(torch::kCPU).contiguous());
  NamedTensorBytes out;
  out.name = name;
  out.dtype = *dtype;
  out.shape = cpu->sizes().vec();
  out.data = static_cast<const uint8_t*>(cpu->data_ptr());
  out.nbytes = cpu->nbytes();
  out.owner = std::move(cpu);
  return out;
}

std::map<std::string, at::Tensor> load_checkpoint_tensors(const std::string& path) {
  const Checkpoint checkpoint = Checkpoint::open(path);
  std::map<std::string, at::Tensor> out;
  for (const auto& name : checkpoint.names()) {
    out.emplace(name, to_tensor(checkpoint.view(name),
                                checkpoint.file_of(name).path() + ": tensor '" + name + "'"));
  }
  return out;
}

namespace {

std::vector<NamedTensorBytes> all_bytes(const std::map<std::string, at::Tensor>& tensors) {
  std::vector<NamedTensorBytes> out;
  out.reserve(tensors.size());
  for (const auto& [name, tensor] : tensors) out.push_back(tensor_bytes(name, tensor));
  return out;
}

}  // namespace

void save_tensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                  const std::map<std::string, std::string>& metadata) {
  write_safetensors(path, all_bytes(tensors), metadata);
}

std::vector<std::string> save_checkpoint_tensors(const std::string& folder,
                                                 const std::map<std::string, at::Tensor>& tensors,
                                                 const std::map<std::string, std::string>& metadata,
                                                 uint64_t max_shard_bytes) {
  return write_checkpoint(folder, all_bytes(tensors), metadata, max_shard_bytes);
}

}  // namespace peftfw::io
