// Minimal, torch-free GGUF v3 writer (the llama.cpp model file format): typed metadata key/values
// and F32 / F16 / BF16 / Q8_0 tensors whose data is produced on demand while the file is written,
// so a large model never has to be resident in memory at once. Encodings are bit-exact with the
// `gguf` Python package (numpy's float16 cast, gguf.quants BF16 / Q8_0).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace peftfw::gguf {

// ggml type ids, as stored in the tensor info.
enum class TensorType : uint32_t { F32 = 0, F16 = 1, Q8_0 = 8, BF16 = 30 };

const char* type_name(TensorType type);  // "F32", "F16", "Q8_0", "BF16"
// Case-insensitive "f32", "f16", "bf16", "q8_0"; throws std::invalid_argument naming the choices.
TensorType parse_type(const std::string& name);

// IEEE binary16 exactly as numpy's astype(float16): round to nearest even, subnormals, overflow to
// inf, NaN payload truncated (kept non-zero).
uint16_t f32_to_f16(float x);
// bfloat16 exactly as gguf-py / ggml_compute_fp32_to_bf16: NaN quieted, round to nearest even.
uint16_t f32_to_bf16(float x);
// Encoded size in bytes of a tensor of `shape` (any order) stored as `type`.
uint64_t tensor_nbytes(const std::vector<uint64_t>& shape, TensorType type);

class Writer {
 public:
  // Receives an empty vector and must leave exactly product(shape) floats in it, row-major.
  using Fill = std::function<void(std::vector<float>&)>;

  // Metadata, written in insertion order. An empty or duplicate key throws std::invalid_argument.
  // "general.alignment" may only be given as a non-zero power-of-two u32 (the reader insists);
  // when absent it is appended as u32 32.
  void add_u8(const std::string& key, uint8_t value);
  void add_i8(const std::string& key, int8_t value);
  void add_u16(const std::string& key, uint16_t value);
  void add_i16(const std::string& key, int16_t value);
  void add_u32(const std::string& key, uint32_t value);
  void add_i32(const std::string& key, int32_t value);
  void add_u64(const std::string& key, uint64_t value);
  void add_i64(const std::string& key, int64_t value);
  void add_f32(const std::string& key, float value);
  void add_f64(const std::string& key, double value);
  void add_bool(const std::string& key, bool value);
  void add_string(const std::string& key, const std::string& value);  // UTF-8 bytes, as given
  void add_array(const std::string& key, const std::vector<int32_t>& values);
  void add_array(const std::string& key, const std::vector<uint32_t>& values);
  void add_array(const std::string& key, const std::vector<float>& values);
  void add_array(const std::string& key, const std::vector<bool>& values);
  void add_array(const std::string& key, const std::vector<std::string>& values);

  // `shape` is row-major (numpy order, outermost first), 1..4 dims. `fill` runs exactly once per
  // write(), in add order. Throws std::invalid_argument for a duplicate or too-long name, a bad
  // shape, a missing fill, or a Q8_0 tensor whose innermost dim is not a multiple of 32.
  void add_tensor(const std::string& name, std::vector<uint64_t> shape, TensorType type, Fill fill);

  // Throws std::runtime_error (naming the path) on I/O failure or when a fill produces the wrong
  // number of values; a partially written file is removed.
  void write(const std::string& path) const;

  size_t tensor_count() const { return tensors_.size(); }

 private:
  struct Kv {
    std::string key;
    std::string bytes;  // value type id + encoded value
  };
  struct Tensor {
    std::string name;
    std::vector<uint64_t> shape;
    TensorType type;
    Fill fill;
  };

  void add_kv(const std::string& key, uint32_t value_type, const std::string& payload);

  std::vector<Kv> kvs_;
  std::vector<Tensor> tensors_;
  uint32_t alignment_ = 32;
  bool has_alignment_ = false;
};

}  // namespace peftfw::gguf
