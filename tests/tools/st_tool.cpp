// st_tool: a thin command-line face of peftfw/io/safetensors for the Python
// oracle test (tests/framework/io/safetensors_oracle.py).
//
//   st_tool dump FILE      prints {"__metadata__": {...},
//                                  name: {"dtype", "shape", "sha256"}, ...}
//   st_tool copy IN OUT    reads IN with our reader, writes OUT with our writer
//
// Errors go to stderr as "st_tool: <message>" with the peftfw exit code
// (2 for bad input such as a malformed file).
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "peftfw/error.hpp"
#include "peftfw/io/safetensors.hpp"

namespace {

// SHA-256 (FIPS 180-4), written out so the tool needs no crypto library.
class Sha256 {
 public:
  void update(const uint8_t* data, std::size_t n) {
    total_bytes_ += n;
    while (n > 0) {
      const std::size_t take = std::min(n, sizeof block_ - block_used_);
      std::memcpy(block_ + block_used_, data, take);
      block_used_ += take;
      data += take;
      n -= take;
      if (block_used_ == sizeof block_) {
        compress(block_);
        block_used_ = 0;
      }
    }
  }

  std::string hex_digest() {
    const uint64_t bit_length = total_bytes_ * 8;
    const uint8_t one = 0x80;
    update(&one, 1);
    const uint8_t zero = 0;
    while (block_used_ != 56) update(&zero, 1);
    uint8_t length[8];
    for (int i = 0; i < 8; ++i) length[i] = static_cast<uint8_t>(bit_length >> (56 - 8 * i));
    update(length, 8);
    std::string out;
    char hex[9];
    for (const uint32_t word : state_) {
      std::snprintf(hex, sizeof hex, "%08x", word);
      out += hex;
    }
    return out;
  }

 private:
  static uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

  void compress(const uint8_t* block) {
    static constexpr uint32_t k[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2};
    uint32_t w[64];
    for (int i = 0; i < 16; ++i) {
      w[i] = (uint32_t{block[4 * i]} << 24) | (uint32_t{block[4 * i + 1]} << 16) |
             (uint32_t{block[4 * i + 2]} << 8) | uint32_t{block[4 * i + 3]};
    }
    for (int i = 16; i < 64; ++i) {
      const uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      const uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = state_[0], b = state_[1], c = state_[2], d = state_[3];
    uint32_t e = state_[4], f = state_[5], g = state_[6], h = state_[7];
    for (int i = 0; i < 64; ++i) {
      const uint32_t t1 = h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) +
                          k[i] + w[i];
      const uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      h = g;
      g = f;
      f = e;
      e = d + t1;
      d = c;
      c = b;
      b = a;
      a = t1 + t2;
    }
    state_[0] += a;
    state_[1] += b;
    state_[2] += c;
    state_[3] += d;
    state_[4] += e;
    state_[5] += f;
    state_[6] += g;
    state_[7] += h;
  }

  uint32_t state_[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                        0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  uint8_t block_[64] = {};
  std::size_t block_used_ = 0;
  uint64_t total_bytes_ = 0;
};

int dump(const std::string& path) {
  const auto file = peftfw::io::SafetensorsFile::open(path);
  nlohmann::json out = nlohmann::json::object();
  out["__metadata__"] = file.metadata();
  for (const auto& name : file.names()) {
    const auto view = file.view(name);
    Sha256 sha;
    sha.update(view.data, view.nbytes);
    out[name] = {{"dtype", peftfw::io::dtype_name(view.dtype)},
                 {"shape", view.shape},
                 {"sha256", sha.hex_digest()}};
  }
  std::cout << out.dump(2) << "\n";
  return 0;
}

int copy(const std::string& in, const std::string& out) {
  const auto file = peftfw::io::SafetensorsFile::open(in);
  std::vector<peftfw::io::NamedTensorBytes> tensors;
  for (const auto& name : file.names()) {
    const auto view = file.view(name);
    tensors.push_back({name, view.dtype, view.shape, view.data, view.nbytes, nullptr});
  }
  peftfw::io::write_safetensors(out, tensors, file.metadata());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> args(argv + 1, argv + argc);
  try {
    if (args.size() == 2 && args[0] == "dump") return dump(args[1]);
    if (args.size() == 3 && args[0] == "copy") return copy(args[1], args[2]);
    std::cerr << "usage: st_tool dump FILE | st_tool copy IN OUT\n";
    return 2;
  } catch (const peftfw::Error& e) {
    std::cerr << "st_tool: " << e.what() << "\n";
    return e.exit_code();
  } catch (const std::exception& e) {
    std::cerr << "st_tool: internal error: " << e.what() << "\n";
    return 1;
  }
}
