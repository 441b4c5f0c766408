// gguf_writer_check OUT.gguf
//
// Writes OUT.gguf (default alignment) and OUT.gguf.align64 (caller-set general.alignment = 64)
// exercising every feature of peftfw::gguf::Writer; gguf_writer_check.py reads them back with the
// `gguf` Python package and recomputes every expected value independently. The writer's error
// paths, which leave no file behind, are checked here. Tensor inputs come from the recipes below,
// which gguf_writer_check.py mirrors exactly (they only use float32-exact arithmetic).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <iostream>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "gguf_writer.hpp"

namespace g = peftfw::gguf;
using Values = std::vector<float>;

namespace {

// ---- input recipes (mirrored in gguf_writer_check.py) ----

// n pseudo-random values r * 2^exp, r a signed 24-bit integer from an LCG (exact in float32).
Values gen(uint32_t seed, size_t n, int exp) {
  Values v;
  uint32_t s = seed;
  for (size_t i = 0; i < n; ++i) {
    s = s * 1664525u + 1013904223u;
    const int32_t r = static_cast<int32_t>(s >> 8) - (1 << 23);
    v.push_back(std::ldexp(static_cast<float>(r), exp));
  }
  return v;
}

Values from_bits(const std::vector<uint32_t>& bits) {
  Values v(bits.size());
  std::memcpy(v.data(), bits.data(), 4 * bits.size());
  return v;
}

Values cat(std::initializer_list<Values> parts) {
  Values v;
  for (const Values& p : parts) v.insert(v.end(), p.begin(), p.end());
  return v;
}

// Rounding edge cases, as float32 bit patterns.
const std::vector<uint32_t> kF32Bits = {
    0x00000000, 0x80000000, 0x3f800000, 0xbf800000, 0x40490fdb, 0x7f800000, 0xff800000,
    0x7fc00000, 0x7fa00001, 0x00000001, 0x807fffff, 0x7f7fffff, 0x3dcccccd};
const std::vector<uint32_t> kF16Bits = {
    0x00000000, 0x80000000, 0x3f800000, 0xbf800000, 0x40490fdb, 0xc0490fdb, 0x3dcccccd,
    0x3f801000, 0x3f803000, 0x3f801001, 0x3f800fff, 0xbf803000,  // halfway cases around 1.0
    0x477fe000, 0x477fefff, 0x477ff000, 0xc77ff000, 0x47800000,  // 65504 and overflow to inf
    0x49742400, 0x7f7fffff, 0x7f800000, 0xff800000,              // 1e6, FLT_MAX, inf
    0x33800000, 0x33000000, 0x33000001, 0x32ffffff, 0x33c00000,  // subnormals around 2^-24
    0x34200000, 0xb3c00000, 0x387fc000, 0x387fe000, 0x38800000,  // ... and up to 2^-14
    0x35555555, 0x00000001, 0x80000001,                           // sticky bits, f32 denormals
    0x7fc00000, 0xffc00000, 0x7fc12345, 0x7f800001, 0x7fa00000};  // NaNs
const std::vector<uint32_t> kBF16Bits = {
    0x00000000, 0x80000000, 0x3f800000, 0x40490fdb, 0xc0490fdb, 0x3dcccccd,
    0x3f808000, 0x3f818000, 0x3f808001, 0x3f807fff, 0xbf818000,  // halfway cases
    0x7f7fffff, 0x7f7f8000, 0x7f7f7fff, 0x7f800000, 0xff800000,  // overflow to inf
    0x00000001, 0x807fffff, 0x00008000, 0x00018000,              // denormals
    0x7fc00000, 0xffc00000, 0x7f800001, 0xffc12345, 0x7f81ffff}; // NaNs (quieted)

// Q8_0 block (max 100) of values within an ulp or two of a rounding tie, where q depends on
// computing x * (1 / d) in float32 exactly as ggml does (x / d, doubles or 127 / amax all differ).
const std::vector<uint32_t> kQ8NearTieBits = {
    0x42c80000, 0x3ec99326, 0xbffbf7ef, 0x403060c1, 0xc062c58a, 0x4062c58b, 0xc08a952a,
    0x40a3c78f, 0xc0d62c58, 0x40ef5ebd, 0xc1044891, 0x4110e1c3, 0xc12a1428, 0x4143468d,
    0xc14fdfbf, 0x415c78f1, 0xc1691224, 0x4175ab56, 0xc1812244, 0x41940810, 0xc19a54a9,
    0x41a0a142, 0xc1b3870e, 0x41b9d3a7, 0xc1c02040, 0x41ccb972, 0xc1d3060b, 0x41d3060c,
    0xc1d952a5, 0x41df9f3e, 0xc1e5ebd7, 0x41ec3870};

// Q8_0 block whose scale is exactly 1 (max 127), so x.5 values are exact rounding ties.
Values q8_ties() {
  Values v = {127.0f};
  for (int j = 1; j < 32; ++j) v.push_back(static_cast<float>(j - 16) + 0.5f);
  return v;
}

struct Spec {
  std::string name;
  std::vector<uint64_t> shape;
  g::TensorType type;
  Values data;
};

std::vector<Spec> specs() {
  using T = g::TensorType;
  const Values zeros32(32, 0.0f);
  Values neg_max = gen(41, 32, -20);
  neg_max[7] = -1000.0f;  // the block's max magnitude is negative: q = -127 there
  Values one_neg = zeros32;
  one_neg[5] = -3.0f;
  Values huge = gen(42, 32, -4);
  huge[3] = 8350000.0f;  // scale 65748 overflows fp16 to inf
  return {
      {"f32.1d", {kF32Bits.size()}, T::F32, from_bits(kF32Bits)},
      {"f32.2d", {3, 5}, T::F32, gen(31, 15, -12)},
      {"f32.3d", {2, 3, 4}, T::F32, gen(32, 24, 0)},
      {"f32.4d", {2, 1, 3, 1}, T::F32, gen(33, 6, -3)},
      {"f16.1d", {kF16Bits.size()}, T::F16, from_bits(kF16Bits)},
      {"f16.2d", {5, 7}, T::F16, gen(11, 35, -36)},  // mostly fp16 subnormals
      {"f16.3d", {2, 3, 11}, T::F16, gen(12, 66, -7)},  // up to 65536: some overflow to inf
      {"bf16.1d", {kBF16Bits.size()}, T::BF16, from_bits(kBF16Bits)},
      {"bf16.2d", {3, 9}, T::BF16, gen(21, 27, -10)},
      {"bf16.3d", {2, 2, 5}, T::BF16, gen(22, 20, 104)},  // near FLT_MAX
      {"q8_0.1d", {128}, T::Q8_0,
       cat({zeros32, q8_ties(), neg_max, from_bits(kQ8NearTieBits)})},
      {"q8_0.2d", {4, 64}, T::Q8_0,
       cat({gen(51, 64, -20),
            gen(52, 64, -32),                     // fp16-subnormal scales
            gen(53, 32, -50), one_neg,            // scale rounds to fp16 zero; one nonzero
            huge, gen(54, 32, 0)})},              // fp16-inf scale; large values
      {"q8_0.3d", {2, 3, 32}, T::Q8_0, gen(55, 192, -16)},
      // Larger than the writer's 65536-value encoding chunk, so chunk boundaries fall mid-row.
      {"f16.big", {150001}, T::F16, gen(13, 150001, -14)},
      {"q8_0.big", {3, 70016}, T::Q8_0, gen(56, 3 * 70016, -9)},
  };
}

// ---- self-checks of the error paths ----

int passed = 0, failed = 0;

void expect(bool ok, const std::string& what) {
  if (ok) {
    ++passed;
  } else {
    ++failed;
    std::cerr << "FAIL: " << what << "\n";
  }
}

// Runs f, expecting an exception of type E whose message contains `needle`.
template <typename E>
void expect_throw(const std::string& what, const std::function<void()>& f,
                  const std::string& needle = "") {
  try {
    f();
    expect(false, what + " (no exception)");
  } catch (const E& e) {
    expect(std::string(e.what()).find(needle) != std::string::npos,
           what + " (message: " + e.what() + ")");
  } catch (const std::exception& e) {
    expect(false, what + " (wrong exception: " + e.what() + ")");
  }
}

bool exists(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f != nullptr) std::fclose(f);
  return f != nullptr;
}

g::Writer::Fill constant(size_t n) {
  return [n](Values& v) { v.assign(n, 1.0f); };
}

void check_errors(const std::string& scratch) {
  using IA = std::invalid_argument;
  using RE = std::runtime_error;
  using T = g::TensorType;

  expect(std::string(g::type_name(T::F32)) == "F32" && std::string(g::type_name(T::F16)) == "F16" &&
             std::string(g::type_name(T::Q8_0)) == "Q8_0" &&
             std::string(g::type_name(T::BF16)) == "BF16",
         "type_name");
  expect(g::parse_type("f32") == T::F32 && g::parse_type("F16") == T::F16 &&
             g::parse_type("bf16") == T::BF16 && g::parse_type("BF16") == T::BF16 &&
             g::parse_type("q8_0") == T::Q8_0 && g::parse_type("Q8_0") == T::Q8_0,
         "parse_type");
  expect_throw<IA>("parse_type rejects q4_0", [] { g::parse_type("q4_0"); }, "q8_0");
  expect_throw<IA>("parse_type rejects empty", [] { g::parse_type(""); }, "bf16");

  g::Writer w;
  w.add_i32("k", 1);
  expect_throw<IA>("duplicate key, same type", [&] { w.add_i32("k", 2); }, "'k'");
  expect_throw<IA>("duplicate key, other type", [&] { w.add_string("k", "x"); }, "'k'");
  expect_throw<IA>("empty key", [&] { w.add_u8("", 1); }, "empty");
  expect_throw<IA>("alignment not u32", [&] { w.add_u64("general.alignment", 32); });
  expect_throw<IA>("alignment not a power of two", [&] { w.add_u32("general.alignment", 48); });
  expect_throw<IA>("alignment zero", [&] { w.add_u32("general.alignment", 0); });

  w.add_tensor("t", {2, 32}, T::Q8_0, constant(64));
  expect(w.tensor_count() == 1, "tensor_count");
  expect_throw<IA>("q8_0 innermost not multiple of 32",
                   [&] { w.add_tensor("q8.bad", {32, 48}, T::Q8_0, constant(32 * 48)); },
                   "q8.bad");
  expect_throw<IA>("duplicate tensor", [&] { w.add_tensor("t", {4}, T::F32, constant(4)); },
                   "'t'");
  expect_throw<IA>("0 dims", [&] { w.add_tensor("d0", {}, T::F32, constant(1)); }, "d0");
  expect_throw<IA>("5 dims", [&] { w.add_tensor("d5", {1, 1, 1, 1, 1}, T::F32, constant(1)); });
  expect_throw<IA>("name too long",
                   [&] { w.add_tensor(std::string(64, 'n'), {1}, T::F32, constant(1)); });
  expect_throw<IA>("no fill", [&] { w.add_tensor("nofill", {1}, T::F32, nullptr); });
  expect_throw<IA>("element count overflow",
                   [&] { w.add_tensor("big", {1ull << 32, 1ull << 32}, T::F32, constant(1)); });
  expect(w.tensor_count() == 1, "rejected tensors are not added");

  // Bad fills throw during write() and leave no partial file.
  const std::string path = scratch + ".bad";
  for (size_t n : {0, 63, 65}) {
    g::Writer bad;
    bad.add_tensor("ok", {3}, T::F32, constant(3));
    bad.add_tensor("short", {2, 32}, T::F16, constant(n));
    expect_throw<RE>("fill writes " + std::to_string(n) + " of 64 values", [&] { bad.write(path); },
                     "short");
    expect(!exists(path), "partial file removed after bad fill");
  }
  g::Writer nan;
  nan.add_tensor("nan", {32}, T::Q8_0, [](Values& v) {
    v.assign(32, 1.0f);
    v[9] = std::numeric_limits<float>::quiet_NaN();
  });
  expect_throw<RE>("non-finite Q8_0 input", [&] { nan.write(path); }, "nan");
  expect(!exists(path), "partial file removed after non-finite Q8_0");
  g::Writer throwing;
  throwing.add_tensor("x", {1}, T::F32, [](Values&) { throw std::logic_error("from fill"); });
  expect_throw<std::logic_error>("fill exception propagates", [&] { throwing.write(path); });
  expect(!exists(path), "partial file removed after fill exception");

  const std::string nowhere = "/nonexistent-dir/x.gguf";
  expect_throw<RE>("unwritable path", [&] { w.write(nowhere); }, nowhere);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: gguf_writer_check OUT.gguf\n";
    return 2;
  }
  const std::string out = argv[1];
  check_errors(out);

  g::Writer w;
  w.add_string("general.name", "gguf writer check");
  w.add_u8("test.u8", 255);
  w.add_i8("test.i8", -128);
  w.add_u16("test.u16", 65535);
  w.add_i16("test.i16", -32768);
  w.add_u32("test.u32", 4294967295u);
  w.add_i32("test.i32", std::numeric_limits<int32_t>::min());
  w.add_u64("test.u64", std::numeric_limits<uint64_t>::max());
  w.add_i64("test.i64", std::numeric_limits<int64_t>::min());
  w.add_f32("test.f32", 0.1f);
  w.add_f32("test.f32_neg_zero", -0.0f);
  w.add_f32("test.f32_inf", std::numeric_limits<float>::infinity());
  w.add_f64("test.f64", 0.1);
  w.add_f64("test.f64_denorm", std::numeric_limits<double>::denorm_min());
  w.add_bool("test.bool_true", true);
  w.add_bool("test.bool_false", false);
  w.add_string("test.string", "h\xc3\xa9llo w\xc3\xb6rld \xe2\x9c\x93 \xf0\x9f\xa6\x99");
  w.add_string("test.string_empty", "");
  w.add_array("test.arr_i32", std::vector<int32_t>{std::numeric_limits<int32_t>::min(), -1, 0, 1,
                                                   std::numeric_limits<int32_t>::max()});
  w.add_array("test.arr_u32", std::vector<uint32_t>{0, 1, 4294967295u});
  w.add_array("test.arr_f32", std::vector<float>{0.5f, -1.25f, 1e-45f, -0.0f,
                                                 std::numeric_limits<float>::infinity(),
                                                 std::numeric_limits<float>::max()});
  w.add_array("test.arr_bool", std::vector<bool>{true, false, true, true});
  w.add_array("test.arr_str", std::vector<std::string>{
                                  "", "a", "tok\xc3\xa9n", "\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e",
                                  "\xf0\x9f\xa6\x99 llama", std::string("nul\0byte", 8)});
  w.add_array("test.arr_i32_empty", std::vector<int32_t>{});
  w.add_array("test.arr_u32_empty", std::vector<uint32_t>{});
  w.add_array("test.arr_f32_empty", std::vector<float>{});
  w.add_array("test.arr_bool_empty", std::vector<bool>{});
  w.add_array("test.arr_str_empty", std::vector<std::string>{});

  // Fills copy their recipe in lazily, as a model exporter would stream its weights.
  const std::vector<Spec> all = specs();
  std::vector<int> calls(all.size(), 0);
  for (size_t i = 0; i < all.size(); ++i) {
    w.add_tensor(all[i].name, all[i].shape, all[i].type, [&all, &calls, i](Values& v) {
      ++calls[i];
      v = all[i].data;
    });
  }
  expect(w.tensor_count() == all.size(), "tensor_count after adds");
  try {
    w.write(out);
  } catch (const std::exception& e) {
    std::cerr << "FAIL: write " << out << ": " << e.what() << "\n";
    return 1;
  }
  bool once = true;
  for (int c : calls) once = once && c == 1;
  expect(once, "each fill called exactly once");

  // Caller-chosen alignment: written where the caller put it, not duplicated.
  g::Writer a;
  a.add_u32("general.alignment", 64);
  a.add_string("test.after_alignment", "x");
  a.add_tensor("a.f16", {3, 7}, g::TensorType::F16, [](Values& v) { v = gen(61, 21, -8); });
  a.add_tensor("a.q8_0", {32}, g::TensorType::Q8_0, [](Values& v) { v = gen(62, 32, -8); });
  a.add_tensor("a.f32", {5}, g::TensorType::F32, [](Values& v) { v = gen(63, 5, -8); });
  a.write(out + ".align64");

  std::cout << "gguf writer self-check: " << passed << " passed, " << failed << " failed\n";
  return failed == 0 ? 0 : 1;
}
