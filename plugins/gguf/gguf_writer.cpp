#include "gguf_writer.hpp"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <stdexcept>

namespace peftfw::gguf {
namespace {

// GGUFValueType ids.
enum : uint32_t {
  kU8 = 0, kI8 = 1, kU16 = 2, kI16 = 3, kU32 = 4, kI32 = 5, kF32 = 6,
  kBool = 7, kString = 8, kArray = 9, kU64 = 10, kI64 = 11, kF64 = 12,
};

constexpr uint32_t kVersion = 3;
constexpr size_t kMaxDims = 4;      // GGML_MAX_DIMS: llama.cpp rejects more
constexpr size_t kMaxNameLen = 63;  // GGML_MAX_NAME 64 includes the NUL
constexpr uint64_t kQ8Block = 32, kQ8Bytes = 2 + 32;  // fp16 scale + 32 int8

uint32_t f32_bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return b;
}

// Explicit little-endian encoding, independent of the host byte order.
void put_le(std::string& s, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) s.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
void put_le(unsigned char* p, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) p[i] = static_cast<unsigned char>((v >> (8 * i)) & 0xff);
}
void put_str(std::string& s, const std::string& v) {
  put_le(s, v.size(), 8);
  s += v;
}
std::string le(uint64_t v, int n) {
  std::string s;
  put_le(s, v, n);
  return s;
}

// Array payload: element type, count, then each element as `width` little-endian bytes.
template <typename T, typename Bits>
std::string array_payload(uint32_t elem_type, int width, const std::vector<T>& values, Bits bits) {
  std::string s = le(elem_type, 4) + le(values.size(), 8);
  for (const auto& v : values) put_le(s, bits(v), width);
  return s;
}

uint64_t numel(const std::vector<uint64_t>& shape) {
  uint64_t n = 1;
  for (uint64_t d : shape) n *= d;
  return n;
}

// Encodes n values (n a multiple of 32 for Q8_0) into out. Returns false on a non-finite Q8_0
// block, whose scale would be meaningless and whose int8 cast would be undefined behaviour.
bool encode(TensorType type, const float* x, size_t n, unsigned char* out) {
  switch (type) {
    case TensorType::F32:
      for (size_t i = 0; i < n; ++i) put_le(out + 4 * i, f32_bits(x[i]), 4);
      return true;
    case TensorType::F16:
      for (size_t i = 0; i < n; ++i) put_le(out + 2 * i, f32_to_f16(x[i]), 2);
      return true;
    case TensorType::BF16:
      for (size_t i = 0; i < n; ++i) put_le(out + 2 * i, f32_to_bf16(x[i]), 2);
      return true;
    case TensorType::Q8_0:
      for (size_t b = 0; b < n / kQ8Block; ++b, x += kQ8Block, out += kQ8Bytes) {
        float amax = 0.0f;
        bool finite = true;
        for (uint64_t j = 0; j < kQ8Block; ++j) {
          finite = finite && std::isfinite(x[j]);
          amax = std::max(amax, std::fabs(x[j]));
        }
        if (!finite) return false;
        // Same float32 arithmetic as ggml's quantize_row_q8_0_ref and gguf-py: the quants use the
        // unrounded float32 scale; only the stored scale is rounded to fp16.
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        put_le(out, f32_to_f16(d), 2);
        for (uint64_t j = 0; j < kQ8Block; ++j) {
          // std::round is half-away-from-zero like roundf / gguf-py's np_roundf; |q| <= 127.
          const int q = static_cast<int>(std::round(x[j] * id));
          out[2 + j] = static_cast<unsigned char>(static_cast<int8_t>(q));
        }
      }
      return true;
  }
  return false;
}

std::runtime_error io_error(const std::string& path, const std::string& why) {
  return std::runtime_error("gguf: " + why + " '" + path + "': " + std::strerror(errno));
}

// Sequential file output that tracks the position, for alignment padding.
struct Sink {
  std::FILE* f;
  const std::string& path;
  uint64_t pos = 0;

  void write(const void* p, size_t n) {
    if (n != 0 && std::fwrite(p, 1, n, f) != n) throw io_error(path, "write failed for");
    pos += n;
  }
  void write(const std::string& s) { write(s.data(), s.size()); }
  void pad(uint64_t align) {
    static const char kZeros[4096] = {};
    for (uint64_t left = (align - pos % align) % align; left != 0;) {
      const size_t m = static_cast<size_t>(std::min<uint64_t>(left, sizeof(kZeros)));
      write(kZeros, m);
      left -= m;
    }
  }
};

}  // namespace

const char* type_name(TensorType type) {
  switch (type) {
    case TensorType::F32: return "F32";
    case TensorType::F16: return "F16";
    case TensorType::Q8_0: return "Q8_0";
    case TensorType::BF16: return "BF16";
  }
  return "?";
}

TensorType parse_type(const std::string& name) {
  std::string s = name;
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (s == "f32") return TensorType::F32;
  if (s == "f16") return TensorType::F16;
  if (s == "bf16") return TensorType::BF16;
  if (s == "q8_0") return TensorType::Q8_0;
  throw std::invalid_argument("gguf: unknown tensor type '" + name +
                              "' (expected one of: f32, f16, bf16, q8_0)");
}

uint16_t f32_to_f16(float x) {
  const uint32_t b = f32_bits(x);
  const uint32_t sign = (b >> 16) & 0x8000u;
  const uint32_t a = b & 0x7fffffffu;
  // NaN: keep the top 10 payload bits, as numpy does (a signalling NaN stays signalling), but
  // never let a payload that lives only in the low bits turn it into inf.
  if (a > 0x7f800000u) {
    return static_cast<uint16_t>(sign | 0x7c00u | std::max((a >> 13) & 0x3ffu, 1u));
  }
  // >= 65536 (and inf) overflows; [65520, 65536) reaches inf through the rounding carry below.
  if (a >= 0x47800000u) return static_cast<uint16_t>(sign | 0x7c00u);
  uint32_t q, rem, half;
  if (a >= 0x38800000u) {
    // Normal half (>= 2^-14): rebias the exponent 127 -> 15 in place, drop 13 mantissa bits.
    const uint32_t v = a - 0x38000000u;
    q = v >> 13;
    rem = v & 0x1fffu;
    half = 0x1000u;
  } else {
    if (a < 0x33000000u) return static_cast<uint16_t>(sign);  // < 2^-25: rounds to (signed) zero
    // Subnormal half, in units of 2^-24: a = m * 2^(e - 150), so shift m right by 126 - e.
    const uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u, shift = 126 - e;
    q = m >> shift;
    rem = m & ((1u << shift) - 1);
    half = 1u << (shift - 1);
  }
  // Round half to even; a carry out of the mantissa correctly bumps the exponent.
  if (rem > half || (rem == half && (q & 1u))) ++q;
  return static_cast<uint16_t>(sign | q);
}

uint16_t f32_to_bf16(float x) {
  uint32_t b = f32_bits(x);
  // gguf-py quiets NaN by setting bit 22 on the truncated value (payload's high bits survive).
  if ((b & 0x7fffffffu) > 0x7f800000u) b = (b & 0xffff0000u) | 0x00400000u;
  return static_cast<uint16_t>((uint64_t{b} + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

uint64_t tensor_nbytes(const std::vector<uint64_t>& shape, TensorType type) {
  const uint64_t n = numel(shape);
  switch (type) {
    case TensorType::F32: return 4 * n;
    case TensorType::F16:
    case TensorType::BF16: return 2 * n;
    case TensorType::Q8_0: return n / kQ8Block * kQ8Bytes;
  }
  return 0;
}

void Writer::add_kv(const std::string& key, uint32_t value_type, const std::string& payload) {
  if (key.empty()) throw std::invalid_argument("gguf: empty metadata key");  // ggml rejects it
  for (const Kv& kv : kvs_) {
    if (kv.key == key) throw std::invalid_argument("gguf: duplicate metadata key '" + key + "'");
  }
  if (key == "general.alignment" && value_type != kU32) {
    throw std::invalid_argument("gguf: general.alignment must be a u32");
  }
  kvs_.push_back({key, le(value_type, 4) + payload});
}

void Writer::add_u8(const std::string& key, uint8_t v) { add_kv(key, kU8, le(v, 1)); }
void Writer::add_i8(const std::string& key, int8_t v) { add_kv(key, kI8, le(uint8_t(v), 1)); }
void Writer::add_u16(const std::string& key, uint16_t v) { add_kv(key, kU16, le(v, 2)); }
void Writer::add_i16(const std::string& key, int16_t v) { add_kv(key, kI16, le(uint16_t(v), 2)); }
void Writer::add_i32(const std::string& key, int32_t v) { add_kv(key, kI32, le(uint32_t(v), 4)); }
void Writer::add_u64(const std::string& key, uint64_t v) { add_kv(key, kU64, le(v, 8)); }
void Writer::add_i64(const std::string& key, int64_t v) { add_kv(key, kI64, le(uint64_t(v), 8)); }
void Writer::add_f32(const std::string& key, float v) { add_kv(key, kF32, le(f32_bits(v), 4)); }
void Writer::add_bool(const std::string& key, bool v) { add_kv(key, kBool, le(v ? 1 : 0, 1)); }
void Writer::add_string(const std::string& key, const std::string& v) {
  std::string s;
  put_str(s, v);
  add_kv(key, kString, s);
}

void Writer::add_u32(const std::string& key, uint32_t v) {
  const bool is_alignment = key == "general.alignment";
  if (is_alignment && (v == 0 || (v & (v - 1)) != 0)) {
    throw std::invalid_argument("gguf: general.alignment must be a non-zero power of two");
  }
  add_kv(key, kU32, le(v, 4));
  if (is_alignment) {
    alignment_ = v;
    has_alignment_ = true;
  }
}

void Writer::add_f64(const std::string& key, double v) {
  uint64_t b;
  std::memcpy(&b, &v, 8);
  add_kv(key, kF64, le(b, 8));
}

// Empty arrays are valid GGUF (gguf-py's reader and llama.cpp read them; only gguf-py's writer
// refuses them) and still record their element type.
void Writer::add_array(const std::string& key, const std::vector<int32_t>& values) {
  add_kv(key, kArray, array_payload(kI32, 4, values, [](int32_t v) { return uint32_t(v); }));
}
void Writer::add_array(const std::string& key, const std::vector<uint32_t>& values) {
  add_kv(key, kArray, array_payload(kU32, 4, values, [](uint32_t v) { return v; }));
}
void Writer::add_array(const std::string& key, const std::vector<float>& values) {
  add_kv(key, kArray, array_payload(kF32, 4, values, f32_bits));
}
void Writer::add_array(const std::string& key, const std::vector<bool>& values) {
  add_kv(key, kArray, array_payload(kBool, 1, values, [](bool v) { return v ? 1 : 0; }));
}
void Writer::add_array(const std::string& key, const std::vector<std::string>& values) {
  std::string s = le(kString, 4) + le(values.size(), 8);
  for (const std::string& v : values) put_str(s, v);
  add_kv(key, kArray, s);
}

void Writer::add_tensor(const std::string& name, std::vector<uint64_t> shape, TensorType type,
                        Fill fill) {
  const std::string what = "gguf: tensor '" + name + "': ";
  for (const Tensor& t : tensors_) {
    if (t.name == name) throw std::invalid_argument(what + "duplicate name");
  }
  if (name.size() > kMaxNameLen) throw std::invalid_argument(what + "name longer than 63 bytes");
  if (shape.empty() || shape.size() > kMaxDims) {
    throw std::invalid_argument(what + "needs 1 to 4 dims, got " + std::to_string(shape.size()));
  }
  uint64_t n = 1;  // ggml keeps element counts in int64
  for (uint64_t d : shape) {
    if (d != 0 && n > uint64_t(std::numeric_limits<int64_t>::max()) / d) {
      throw std::invalid_argument(what + "too many elements");
    }
    n *= d;
  }
  if (type == TensorType::Q8_0 && shape.back() % kQ8Block != 0) {
    throw std::invalid_argument(what + "Q8_0 needs the innermost dim (" +
                                std::to_string(shape.back()) + ") to be a multiple of 32");
  }
  if (type_name(type)[0] == '?') throw std::invalid_argument(what + "unsupported type");
  if (!fill) throw std::invalid_argument(what + "no fill function");
  tensors_.push_back({name, std::move(shape), type, std::move(fill)});
}

void Writer::write(const std::string& path) const {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) throw io_error(path, "cannot open for writing");
  Sink out{f, path};
  try {
    const bool add_alignment = !has_alignment_;
    std::string header = "GGUF" + le(kVersion, 4) + le(tensors_.size(), 8) +
                         le(kvs_.size() + (add_alignment ? 1 : 0), 8);
    for (const Kv& kv : kvs_) {
      put_str(header, kv.key);
      header += kv.bytes;
    }
    if (add_alignment) {
      put_str(header, "general.alignment");
      header += le(kU32, 4) + le(alignment_, 4);
    }
    // Tensor infos: dims innermost first (ggml's ne[0]), offsets relative to the data section,
    // each tensor starting on an alignment boundary.
    uint64_t offset = 0;
    for (const Tensor& t : tensors_) {
      put_str(header, t.name);
      put_le(header, t.shape.size(), 4);
      for (auto d = t.shape.rbegin(); d != t.shape.rend(); ++d) put_le(header, *d, 8);
      put_le(header, static_cast<uint32_t>(t.type), 4);
      put_le(header, offset, 8);
      const uint64_t nbytes = tensor_nbytes(t.shape, t.type);
      offset += (nbytes + alignment_ - 1) / alignment_ * alignment_;
    }
    out.write(header);
    out.pad(alignment_);

    // Encode in chunks (a multiple of the Q8_0 block) so only the float copy is tensor-sized.
    constexpr size_t kChunk = size_t{1} << 16;
    std::vector<float> values;
    std::vector<unsigned char> buf;
    for (const Tensor& t : tensors_) {
      values.clear();
      t.fill(values);
      const uint64_t n = numel(t.shape);
      if (values.size() != n) {
        throw std::runtime_error("gguf: fill for tensor '" + t.name + "' produced " +
                                 std::to_string(values.size()) + " values, expected " +
                                 std::to_string(n) + " (writing '" + path + "')");
      }
      for (size_t i = 0; i < n; i += kChunk) {
        const size_t m = static_cast<size_t>(std::min<uint64_t>(kChunk, n - i));
        buf.resize(tensor_nbytes({m}, t.type));
        if (!encode(t.type, values.data() + i, m, buf.data())) {
          throw std::runtime_error("gguf: non-finite value in Q8_0 tensor '" + t.name +
                                   "' (writing '" + path + "')");
        }
        out.write(buf.data(), buf.size());
      }
      // The last tensor is padded too: ggml reads the data blob as the sum of padded sizes.
      out.pad(alignment_);
    }
    out.f = nullptr;
    if (std::fclose(f) != 0) throw io_error(path, "failed to finish writing");
  } catch (...) {
    if (out.f != nullptr) std::fclose(out.f);
    std::remove(path.c_str());
    throw;
  }
}

}  // namespace peftfw::gguf
