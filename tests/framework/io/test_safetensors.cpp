// Tests for peftfw/io/safetensors: round trips, every malformed-header case the
// reader must reject (each with a message naming file, tensor and numbers),
// atomic writing, and transformers-style sharded checkpoints.
//
// Malformed files are built byte by byte here; files written by the Python
// package are covered by safetensors_oracle.py.
#include "peftfw/io/fs.hpp"
#include "peftfw/io/safetensors.hpp"

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <set>
#include <string>
#include <vector>

#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include "../../common/expect_error.hpp"
#include <nlohmann/json.hpp>

#include "peftfw/error.hpp"

namespace peftfw::io {
namespace {

namespace fs = std::filesystem;

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "peftfw_st_XXXXXX").string();
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { peftfw::io::remove_tree(dir_); }

  std::string path(const std::string& name) const { return (fs::path(dir_) / name).string(); }

  // Files in the test folder, for "nothing left behind" checks.
  std::set<std::string> listing(const std::string& folder = "") const {
    std::set<std::string> out;
    for (const auto& e : fs::directory_iterator(folder.empty() ? dir_ : folder)) {
      out.insert(e.path().filename().string());
    }
    return out;
  }

  std::string dir_;
};

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out << bytes;
}

std::string le64(uint64_t v) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  return out;
}

// A raw safetensors file: length prefix, header text, `data_bytes` zero bytes.
std::string raw_file(const std::string& header, std::size_t data_bytes) {
  return le64(header.size()) + header + std::string(data_bytes, '\0');
}

using peftfw::testing::expect_input_error;

struct OwnedTensor {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

OwnedTensor make_tensor(std::string name, DType dtype, std::vector<int64_t> shape, int seed) {
  int64_t numel = 1;
  for (const auto d : shape) numel *= d;
  std::vector<uint8_t> bytes(static_cast<std::size_t>(numel) * dtype_size(dtype));
  for (std::size_t i = 0; i < bytes.size(); ++i) {
    bytes[i] = static_cast<uint8_t>(dtype == DType::BOOL ? (i + seed) % 2 : i * 37 + seed * 11);
  }
  return {std::move(name), dtype, std::move(shape), std::move(bytes)};
}

std::vector<NamedTensorBytes> as_named(const std::vector<OwnedTensor>& tensors) {
  std::vector<NamedTensorBytes> out;
  for (const auto& t : tensors) {
    out.push_back({t.name, t.dtype, t.shape, t.bytes.data(), t.bytes.size(), nullptr});
  }
  return out;
}

void expect_same(const TensorView& view, const OwnedTensor& t) {
  EXPECT_EQ(view.dtype, t.dtype) << t.name;
  EXPECT_EQ(view.shape, t.shape) << t.name;
  ASSERT_EQ(view.nbytes, t.bytes.size()) << t.name;
  EXPECT_EQ(std::memcmp(view.data, t.bytes.data(), t.bytes.size()), 0) << t.name;
}

const std::vector<DType> kAllDTypes = {DType::F64, DType::F32, DType::F16, DType::BF16,
                                       DType::I64, DType::I32, DType::I16, DType::I8,
                                       DType::U8,  DType::BOOL};

// ---- dtypes -------------------------------------------------------------------------------------

TEST(DTypeTest, NamesAndSizesMatchTheFormat) {
  const std::vector<std::pair<std::string, std::size_t>> expected = {
      {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8},
      {"I32", 4}, {"I16", 2}, {"I8", 1},  {"U8", 1},   {"BOOL", 1}};
  for (std::size_t i = 0; i < kAllDTypes.size(); ++i) {
    EXPECT_EQ(dtype_name(kAllDTypes[i]), expected[i].first);
    EXPECT_EQ(dtype_size(kAllDTypes[i]), expected[i].second);
    EXPECT_EQ(dtype_from_name(expected[i].first), kAllDTypes[i]);
  }
  EXPECT_FALSE(dtype_from_name("f32").has_value());
  EXPECT_FALSE(dtype_from_name("F8_E4M3").has_value());
}

// ---- round trips --------------------------------------------------------------------------------

TEST_F(SafetensorsTest, RoundTripsEveryDTypeAndOddShapes) {
  std::vector<OwnedTensor> tensors;
  int seed = 0;
  for (const DType d : kAllDTypes) {
    const std::string base = std::string("t.") + dtype_name(d);
    tensors.push_back(make_tensor(base + ".matrix", d, {2, 3}, seed++));
    tensors.push_back(make_tensor(base + ".scalar", d, {}, seed++));
    tensors.push_back(make_tensor(base + ".empty", d, {0, 4}, seed++));
    tensors.push_back(make_tensor(base + ".odd", d, {3, 1, 5}, seed++));
  }
  write_safetensors(path("all.safetensors"), as_named(tensors));

  const auto file = SafetensorsFile::open(path("all.safetensors"));
  EXPECT_EQ(file.size(), tensors.size());
  EXPECT_TRUE(file.metadata().empty());
  for (const auto& t : tensors) {
    ASSERT_TRUE(file.has(t.name)) << t.name;
    const TensorView view = file.view(t.name);
    expect_same(view, t);
    // Data is ordered by element size, so every tensor is naturally aligned.
    EXPECT_EQ(reinterpret_cast<uintptr_t>(view.data) % dtype_size(t.dtype), 0u) << t.name;
  }
  const auto names = file.names();
  EXPECT_TRUE(std::is_sorted(names.begin(), names.end()));
}

TEST_F(SafetensorsTest, HeaderIsSortedPaddedAndOrderedByElementSize) {
  const auto small = make_tensor("b.second", DType::I8, {3}, 1);
  const auto large = make_tensor("a.first", DType::F32, {2}, 2);
  write_safetensors(path("x.safetensors"), as_named({small, large}), {{"format", "pt"}});
  const std::string bytes = read_bytes(path("x.safetensors"));
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(bytes[i]);
  EXPECT_EQ(n % 8, 0u);
  EXPECT_EQ(bytes.size(), 8 + n + 8 + 3);
  const std::string header = bytes.substr(8, n);
  const std::string json_text = header.substr(0, header.find_last_not_of(' ') + 1);
  EXPECT_EQ(header.substr(json_text.size()), std::string(header.size() - json_text.size(), ' '));
  const auto parsed = nlohmann::ordered_json::parse(json_text);
  std::vector<std::string> keys;
  for (auto it = parsed.begin(); it != parsed.end(); ++it) keys.push_back(it.key());
  EXPECT_EQ(keys, (std::vector<std::string>{"__metadata__", "a.first", "b.second"}));
  EXPECT_EQ(parsed["a.first"]["data_offsets"], nlohmann::ordered_json::parse("[0, 8]"));
  EXPECT_EQ(parsed["b.second"]["data_offsets"], nlohmann::ordered_json::parse("[8, 11]"));
  EXPECT_EQ(parsed["__metadata__"]["format"], "pt");
}

TEST_F(SafetensorsTest, MetadataRoundTrips) {
  const std::map<std::string, std::string> metadata = {
      {"format", "pt"},
      {"peftfw.adapter", "lora"},
      {"unicode", "\xc3\xbc" "n" "\xc3\xaf" "c" "\xc3\xb6" "de"},
      {"empty", ""},
      {"json", "{\"r\": 8}"}};
  const auto t = make_tensor("w", DType::BF16, {4}, 3);
  write_safetensors(path("m.safetensors"), as_named({t}), metadata);
  const auto file = SafetensorsFile::open(path("m.safetensors"));
  EXPECT_EQ(file.metadata(), metadata);
  expect_same(file.view("w"), t);
}

TEST_F(SafetensorsTest, EmptyFileRoundTrips) {
  write_safetensors(path("e.safetensors"), {});
  const auto file = SafetensorsFile::open(path("e.safetensors"));
  EXPECT_EQ(file.size(), 0u);
  EXPECT_EQ(read_bytes(path("e.safetensors")).size(), 16u);  // length + "{}" padded to 8
}

TEST_F(SafetensorsTest, ReadsHandWrittenFileInAnyKeyOrder) {
  // Offsets listed out of order in the header, no padding: still valid.
  const std::string header =
      R"({"b":{"shape":[2],"dtype":"I16","data_offsets":[4,8]},)"
      R"("a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"__metadata__":null})";
  std::string bytes = le64(header.size()) + header + "\x01\x02\x03\x04\x05\x06\x07\x08";
  write_bytes(path("h.safetensors"), bytes);
  const auto file = SafetensorsFile::open(path("h.safetensors"));
  EXPECT_EQ(file.names(), (std::vector<std::string>{"a", "b"}));
  const auto b = file.view("b");
  EXPECT_EQ(b.dtype, DType::I16);
  EXPECT_EQ(b.nbytes, 4u);
  EXPECT_EQ(b.data[0], 5);
  EXPECT_TRUE(file.metadata().empty());
}

TEST_F(SafetensorsTest, MissingTensorNamesFileAndTensor) {
  write_safetensors(path("m.safetensors"), as_named({make_tensor("w", DType::F32, {1}, 0)}));
  const auto file = SafetensorsFile::open(path("m.safetensors"));
  expect_input_error([&] { file.view("model.nope"); }, {"m.safetensors", "'model.nope'"});
}

TEST_F(SafetensorsTest, FileSurvivesMove) {
  const auto t = make_tensor("w", DType::I32, {5}, 4);
  write_safetensors(path("m.safetensors"), as_named({t}));
  auto first = SafetensorsFile::open(path("m.safetensors"));
  SafetensorsFile second = std::move(first);
  std::vector<SafetensorsFile> files;
  files.push_back(std::move(second));
  expect_same(files[0].view("w"), t);
}

// ---- malformed files ----------------------------------------------------------------------------

TEST_F(SafetensorsTest, RejectsMissingFile) {
  expect_input_error([&] { SafetensorsFile::open(path("absent.safetensors")); },
                     {"absent.safetensors", "no such file"});
}

TEST_F(SafetensorsTest, RejectsFileShorterThanLengthPrefix) {
  write_bytes(path("short.safetensors"), std::string("\x05\0\0\0\0", 5));
  expect_input_error([&] { SafetensorsFile::open(path("short.safetensors")); },
                     {"short.safetensors", "file is 5 bytes", "8-byte header length"});
  write_bytes(path("zero.safetensors"), "");
  expect_input_error([&] { SafetensorsFile::open(path("zero.safetensors")); },
                     {"zero.safetensors", "file is 0 bytes"});
}

TEST_F(SafetensorsTest, RejectsHeaderLongerThanFile) {
  write_bytes(path("f.safetensors"), le64(100) + "{\"a\": 1}  ");
  expect_input_error([&] { SafetensorsFile::open(path("f.safetensors")); },
                     {"f.safetensors", "header length 100 but only 10 bytes follow"});
}

TEST_F(SafetensorsTest, RejectsHugeHeaderLength) {
  write_bytes(path("f.safetensors"), le64(uint64_t{1} << 62) + "{}");
  expect_input_error([&] { SafetensorsFile::open(path("f.safetensors")); },
                     {"f.safetensors", "header length 4611686018427387904", "limit of 100000000"});
  write_bytes(path("g.safetensors"), le64(~uint64_t{0}) + "{}");
  expect_input_error([&] { SafetensorsFile::open(path("g.safetensors")); }, {"exceeds"});
}

TEST_F(SafetensorsTest, RejectsHeaderThatIsNotJson) {
  write_bytes(path("f.safetensors"), raw_file("{not json}", 0));
  expect_input_error([&] { SafetensorsFile::open(path("f.safetensors")); },
                     {"f.safetensors", "header is not valid JSON"});
  write_bytes(path("g.safetensors"), raw_file("\xff\xfe", 0));
  expect_input_error([&] { SafetensorsFile::open(path("g.safetensors")); },
                     {"header is not valid JSON"});
}

TEST_F(SafetensorsTest, RejectsNulAndByteOrderMarkInHeader) {
  // The JSON library would stop at the NUL and never see the garbage after it.
  write_bytes(path("f.safetensors"), raw_file(std::string("{}\0garbage", 10), 0));
  expect_input_error([&] { SafetensorsFile::open(path("f.safetensors")); },
                     {"f.safetensors: header contains a NUL byte at offset 2"});
  write_bytes(path("g.safetensors"), raw_file("\xEF\xBB\xBF{}", 0));
  expect_input_error([&] { SafetensorsFile::open(path("g.safetensors")); },
                     {"byte order mark"});
}

TEST_F(SafetensorsTest, HeaderNumberBeyondADoubleIsInvalidJson) {
  write_bytes(path("f.safetensors"), raw_file(R"({"__metadata__": 1e400})", 0));
  expect_input_error([&] { SafetensorsFile::open(path("f.safetensors")); },
                     {"f.safetensors: header is not valid JSON (number overflow parsing '1e400'"});
}

TEST_F(SafetensorsTest, LongNamesFromTheFileAreCutInMessages) {
  const std::string name(100000, 'n');
  const std::string entry = R"({"dtype":"F8","shape":[2],"data_offsets":[0,2]})";
  write_bytes(path("f.safetensors"), raw_file("{\"" + name + "\":" + entry + "}", 2));
  try {
    SafetensorsFile::open(path("f.safetensors"));
    ADD_FAILURE() << "expected InputError";
  } catch (const InputError& e) {
    const std::string message = e.what();
    EXPECT_LT(message.size(), 600u) << message.substr(0, 700);
    EXPECT_NE(message.find("tensor '" + std::string(200, 'n') + "...' (100000 bytes in all): "
                           "dtype 'F8' is not supported"),
              std::string::npos)
        << message.substr(0, 700);
  }
}

TEST_F(SafetensorsTest, FromBytesChecksLikeOpen) {
  // "e": 2^32 * 2^31 = 2^63 bytes fit a uint64 byte count, but not an int64 element count.
  const std::string header = R"({"e":{"dtype":"U8","shape":[4294967296,2147483648,0],)"
                             R"("data_offsets":[0,0]},"w":{"dtype":"U8","shape":[3],)"
                             R"("data_offsets":[0,3]}})";
  const std::string bytes = raw_file(header, 0) + "abc";
  const SafetensorsFile file = SafetensorsFile::from_bytes(
      "mem.safetensors", reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
  EXPECT_EQ(file.names(), (std::vector<std::string>{"e", "w"}));
  // The partial product 2^63 overflows int64 before the 0: numel is 0 all the same.
  EXPECT_EQ(file.view("e").numel(), 0);
  EXPECT_EQ(file.view("w").numel(), 3);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(file.view("w").data), 3), "abc");
  expect_input_error(
      [&] {
        SafetensorsFile::from_bytes("mem.safetensors",
                                    reinterpret_cast<const uint8_t*>(bytes.data()), 7);
      },
      {"mem.safetensors: file is 7 bytes, shorter than the 8-byte header length"});
  expect_input_error(
      [&] {
        SafetensorsFile::from_bytes("mem.safetensors",
                                    reinterpret_cast<const uint8_t*>(bytes.data()),
                                    bytes.size() - 1);
      },
      {"mem.safetensors: tensor 'w': data_offsets [0, 3] reach beyond the 2-byte data section"});
}

TEST_F(SafetensorsTest, RejectsHeaderThatIsNotAnObject) {
  write_bytes(path("f.safetensors"), raw_file("[1, 2]", 0));
  expect_input_error([&] { SafetensorsFile::open(path("f.safetensors")); },
                     {"f.safetensors", "header must be a JSON object, found array of 2 elements"});
}

TEST_F(SafetensorsTest, RejectsUnknownDType) {
  write_bytes(path("f.safetensors"),
              raw_file(R"({"x":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}})", 2));
  expect_input_error([&] { SafetensorsFile::open(path("f.safetensors")); },
                     {"f.safetensors: tensor 'x': dtype 'F8_E4M3' is not supported",
                      "F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL"});
  write_bytes(path("g.safetensors"),
              raw_file(R"({"x":{"dtype":4,"shape":[2],"data_offsets":[0,2]}})", 2));
  expect_input_error([&] { SafetensorsFile::open(path("g.safetensors")); },
                     {"tensor 'x': dtype: expected a string, found integer 4"});
}

TEST_F(SafetensorsTest, RejectsShapeThatDoesNotMatchByteLength) {
  write_bytes(path("model.safetensors"),
              raw_file(R"({"x.weight":{"dtype":"F32","shape":[2,3],"data_offsets":[0,12]}})", 12));
  expect_input_error(
      [&] { SafetensorsFile::open(path("model.safetensors")); },
      {"model.safetensors: tensor 'x.weight': data_offsets [0, 12] hold 12 bytes but shape "
       "[2, 3] of F32 needs 24"});
}

TEST_F(SafetensorsTest, RejectsNegativeOrNonIntegerShape) {
  write_bytes(path("f.safetensors"),
              raw_file(R"({"x":{"dtype":"F32","shape":[-1,3],"data_offsets":[0,0]}})", 0));
  expect_input_error([&] { SafetensorsFile::open(path("f.safetensors")); },
                     {"tensor 'x': shape[0]: expected a non-negative integer, found integer -1"});
  write_bytes(path("g.safetensors"),
              raw_file(R"({"x":{"dtype":"F32","shape":[2.5],"data_offsets":[0,0]}})", 0));
  expect_input_error([&] { SafetensorsFile::open(path("g.safetensors")); },
                     {"shape[0]: expected a non-negative integer, found float 2.5"});
  write_bytes(path("h.safetensors"),
              raw_file(R"({"x":{"dtype":"F32","shape":"2","data_offsets":[0,0]}})", 0));
  expect_input_error([&] { SafetensorsFile::open(path("h.safetensors")); },
                     {"shape: expected an array"});
}

TEST_F(SafetensorsTest, RejectsShapeWhoseByteCountOverflows) {
  write_bytes(path("f.safetensors"),
              raw_file(R"({"x":{"dtype":"F64","shape":[4294967296,4294967296],)"
                       R"("data_offsets":[0,0]}})",
                       0));
  expect_input_error([&] { SafetensorsFile::open(path("f.safetensors")); },
                     {"tensor 'x': shape [4294967296, 4294967296] of F64 overflows"});
}

TEST_F(SafetensorsTest, RejectsOffsetsOutsideTheFile) {
  write_bytes(path("f.safetensors"),
              raw_file(R"({"x":{"dtype":"F32","shape":[2,3],"data_offsets":[100,124]}})", 24));
  expect_input_error([&] { SafetensorsFile::open(path("f.safetensors")); },
                     {"f.safetensors: tensor 'x': data_offsets [100, 124] reach beyond the "
                      "24-byte data section"});
}

TEST_F(SafetensorsTest, RejectsDataShorterThanOffsets) {
  // A download cut short: the header is intact, the data is not.
  write_bytes(path("f.safetensors"),
              raw_file(R"({"x":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}})", 12));
  expect_input_error([&] { SafetensorsFile::open(path("f.safetensors")); },
                     {"tensor 'x': data_offsets [0, 24] reach beyond the 12-byte data section",
                      "truncated"});
}

TEST_F(SafetensorsTest, RejectsOffsetsEndingBeforeTheyBegin) {
  write_bytes(path("f.safetensors"),
              raw_file(R"({"x":{"dtype":"U8","shape":[0],"data_offsets":[8,4]}})", 8));
  expect_input_error([&] { SafetensorsFile::open(path("f.safetensors")); },
                     {"tensor 'x': data_offsets [8, 4] end before they begin"});
  write_bytes(path("g.safetensors"),
              raw_file(R"({"x":{"dtype":"U8","shape":[4],"data_offsets":[0]}})", 4));
  expect_input_error([&] { SafetensorsFile::open(path("g.safetensors")); },
                     {"data_offsets: expected [begin, end], found array of 1 element"});
}

TEST_F(SafetensorsTest, RejectsOverlappingOffsets) {
  write_bytes(path("f.safetensors"),
              raw_file(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                       R"("b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}})",
                       24));
  expect_input_error([&] { SafetensorsFile::open(path("f.safetensors")); },
                     {"f.safetensors: tensor 'b': data_offsets [8, 24] overlap tensor 'a', "
                      "which ends at 16"});
}

TEST_F(SafetensorsTest, RejectsGapInOffsets) {
  write_bytes(path("f.safetensors"),
              raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                       R"("b":{"dtype":"F32","shape":[2],"data_offsets":[16,24]}})",
                       24));
  expect_input_error([&] { SafetensorsFile::open(path("f.safetensors")); },
                     {"tensor 'b': data_offsets [16, 24] leave a gap of 8 bytes after tensor 'a'"});
  write_bytes(path("g.safetensors"),
              raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12));
  expect_input_error([&] { SafetensorsFile::open(path("g.safetensors")); },
                     {"leave a gap of 4 bytes after the header"});
}

TEST_F(SafetensorsTest, RejectsTrailingBytesAfterLastTensor) {
  write_bytes(path("f.safetensors"),
              raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 12));
  expect_input_error([&] { SafetensorsFile::open(path("f.safetensors")); },
                     {"data section is 12 bytes but the tensors cover only 8"});
}

TEST_F(SafetensorsTest, RejectsDuplicateTensorNames) {
  write_bytes(path("f.safetensors"),
              raw_file(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},)"
                       R"("a":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}})",
                       4));
  expect_input_error([&] { SafetensorsFile::open(path("f.safetensors")); },
                     {"header lists tensor 'a' more than once"});
}

TEST_F(SafetensorsTest, RejectsMalformedEntriesAndMetadata) {
  write_bytes(path("f.safetensors"), raw_file(R"({"a":[1,2]})", 0));
  expect_input_error([&] { SafetensorsFile::open(path("f.safetensors")); },
                     {"tensor 'a': expected an object"});
  write_bytes(path("g.safetensors"),
              raw_file(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2],"q":1}})", 2));
  expect_input_error([&] { SafetensorsFile::open(path("g.safetensors")); },
                     {"tensor 'a': unexpected field 'q'"});
  write_bytes(path("h.safetensors"), raw_file(R"({"a":{"dtype":"U8","shape":[0]}})", 0));
  expect_input_error([&] { SafetensorsFile::open(path("h.safetensors")); },
                     {"tensor 'a': missing field 'data_offsets'"});
  write_bytes(path("i.safetensors"), raw_file(R"({"__metadata__":{"n":3}})", 0));
  expect_input_error([&] { SafetensorsFile::open(path("i.safetensors")); },
                     {"__metadata__ key 'n': expected a string, found integer 3"});
  write_bytes(path("j.safetensors"), raw_file(R"({"__metadata__":"x"})", 0));
  expect_input_error([&] { SafetensorsFile::open(path("j.safetensors")); },
                     {"__metadata__: expected an object of strings"});
}

// ---- writing ------------------------------------------------------------------------------------

TEST_F(SafetensorsTest, WriterLeavesNoTemporaryFile) {
  write_safetensors(path("w.safetensors"), as_named({make_tensor("a", DType::F16, {8}, 1)}));
  write_safetensors(path("w.safetensors"), as_named({make_tensor("b", DType::F16, {8}, 2)}));
  EXPECT_EQ(listing(), (std::set<std::string>{"w.safetensors"}));
  EXPECT_TRUE(SafetensorsFile::open(path("w.safetensors")).has("b"));
}

TEST_F(SafetensorsTest, WriterFailsWhenFolderIsMissing) {
  const std::string target = path("no/such/dir/w.safetensors");
  EXPECT_THROW(write_safetensors(target, as_named({make_tensor("a", DType::U8, {4}, 0)})),
               RuntimeError);
  EXPECT_FALSE(fs::exists(target));
  EXPECT_TRUE(listing().empty());
}

TEST_F(SafetensorsTest, FailedRenameKeepsDestinationAndRemovesTemporary) {
  // The destination is a non-empty folder, so the final rename fails.
  fs::create_directories(path("w.safetensors/keep"));
  EXPECT_THROW(write_safetensors(path("w.safetensors"),
                                 as_named({make_tensor("a", DType::U8, {4}, 0)})),
               RuntimeError);
  EXPECT_TRUE(fs::exists(path("w.safetensors/keep")));
  EXPECT_EQ(listing(), (std::set<std::string>{"w.safetensors"}));
}

TEST_F(SafetensorsTest, FailedWriteKeepsOldFileIntact) {
  write_safetensors(path("w.safetensors"), as_named({make_tensor("old", DType::U8, {4}, 0)}));
  const std::string before = read_bytes(path("w.safetensors"));

  // Make write() fail part-way: a 64 KiB file size limit against a 4 MiB
  // tensor gives EFBIG (SIGXFSZ ignored so the process survives).
  const auto big = make_tensor("big", DType::F32, {1 << 20}, 1);
  struct rlimit saved {};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &saved), 0);
  const auto old_handler = ::signal(SIGXFSZ, SIG_IGN);
  struct rlimit limited = saved;
  limited.rlim_cur = 64 * 1024;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &limited), 0);
  bool threw = false;
  std::string message;
  try {
    write_safetensors(path("w.safetensors"), as_named({big}));
  } catch (const RuntimeError& e) {
    threw = true;
    message = e.what();
  }
  ::setrlimit(RLIMIT_FSIZE, &saved);
  ::signal(SIGXFSZ, old_handler);

  EXPECT_TRUE(threw);
  EXPECT_NE(message.find("w.safetensors"), std::string::npos) << message;
  EXPECT_EQ(read_bytes(path("w.safetensors")), before);
  EXPECT_EQ(listing(), (std::set<std::string>{"w.safetensors"}));
}

TEST_F(SafetensorsTest, WriterRejectsInconsistentTensorsBeforeTouchingDisk) {
  write_safetensors(path("w.safetensors"), as_named({make_tensor("old", DType::U8, {4}, 0)}));
  const std::string before = read_bytes(path("w.safetensors"));
  auto t = make_tensor("x", DType::F32, {2, 3}, 0);
  auto named = as_named({t});
  named[0].nbytes = 12;
  expect_input_error([&] { write_safetensors(path("w.safetensors"), named); },
                     {"tensor 'x'", "shape [2, 3] of F32 needs 24 bytes but 12 were given"});
  auto twice = as_named({t, t});
  expect_input_error([&] { write_safetensors(path("w.safetensors"), twice); },
                     {"tensor 'x'", "occurs twice"});
  auto reserved = as_named({t});
  reserved[0].name = "__metadata__";
  expect_input_error([&] { write_safetensors(path("w.safetensors"), reserved); }, {"reserved"});
  auto negative = as_named({t});
  negative[0].shape = {-2, -3};
  expect_input_error([&] { write_safetensors(path("w.safetensors"), negative); },
                     {"negative dimension"});
  EXPECT_EQ(read_bytes(path("w.safetensors")), before);
  EXPECT_EQ(listing(), (std::set<std::string>{"w.safetensors"}));
}

TEST_F(SafetensorsTest, WriteFileAtomicReplacesContents) {
  write_file_atomic(path("config.json"), "{\"a\": 1}\n");
  write_file_atomic(path("config.json"), "{\"a\": 2}\n");
  EXPECT_EQ(read_bytes(path("config.json")), "{\"a\": 2}\n");
  EXPECT_EQ(listing(), (std::set<std::string>{"config.json"}));
  EXPECT_THROW(write_file_atomic(path("missing/config.json"), "{}"), RuntimeError);
}

TEST_F(SafetensorsTest, AtomicFileWriterDiscardsUncommittedWrites) {
  {
    AtomicFileWriter writer(path("partial.bin"));
    writer.write("abc", 3);
    EXPECT_TRUE(fs::exists(writer.temp_path()));
  }
  EXPECT_TRUE(listing().empty());
}

// ---- checkpoint folders -------------------------------------------------------------------------

std::vector<OwnedTensor> five_tensors() {
  // 40 bytes each: with a 100-byte limit they pack as (a, b), (c, d), (e).
  std::vector<OwnedTensor> out;
  for (const char* name : {"layers.0.a", "layers.0.b", "layers.1.a", "layers.1.b", "norm"}) {
    out.push_back(make_tensor(name, DType::F32, {10}, static_cast<int>(out.size())));
  }
  return out;
}

TEST_F(SafetensorsTest, ShardedWriteAndRead) {
  const auto tensors = five_tensors();
  const std::string folder = path("ckpt");
  const auto written = write_checkpoint(folder, as_named(tensors), {{"format", "pt"}}, 100);
  EXPECT_EQ(written, (std::vector<std::string>{
                         "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                         "model-00003-of-00003.safetensors", "model.safetensors.index.json"}));
  EXPECT_EQ(listing(folder), std::set<std::string>(written.begin(), written.end()));

  const auto index = nlohmann::json::parse(read_bytes(folder + "/model.safetensors.index.json"));
  EXPECT_EQ(index["metadata"]["total_size"], 200);
  EXPECT_EQ(index["weight_map"]["layers.0.b"], "model-00001-of-00003.safetensors");
  EXPECT_EQ(index["weight_map"]["layers.1.a"], "model-00002-of-00003.safetensors");
  EXPECT_EQ(index["weight_map"]["norm"], "model-00003-of-00003.safetensors");

  const auto ckpt = Checkpoint::open(folder);
  EXPECT_TRUE(ckpt.sharded());
  EXPECT_EQ(ckpt.files().size(), 3u);
  EXPECT_EQ(ckpt.index()->total_size(), 200u);
  EXPECT_EQ(ckpt.size(), tensors.size());
  for (const auto& t : tensors) {
    expect_same(ckpt.view(t.name), t);
    EXPECT_EQ(ckpt.file_of(t.name).metadata().at("format"), "pt");
  }
  EXPECT_EQ(fs::path(ckpt.file_of("norm").path()).filename(), "model-00003-of-00003.safetensors");
  expect_input_error([&] { ckpt.view("lm_head.weight"); }, {"ckpt", "'lm_head.weight'"});

  // Opening the index file directly gives the same checkpoint.
  EXPECT_EQ(Checkpoint::open(folder + "/model.safetensors.index.json").names(), ckpt.names());
}

TEST_F(SafetensorsTest, OversizedTensorGetsItsOwnShard) {
  std::vector<OwnedTensor> tensors = {make_tensor("small.a", DType::U8, {10}, 0),
                                      make_tensor("huge", DType::U8, {500}, 1),
                                      make_tensor("small.b", DType::U8, {10}, 2)};
  const auto written = write_checkpoint(path("ckpt"), as_named(tensors), {}, 100);
  ASSERT_EQ(written.size(), 4u);
  const auto ckpt = Checkpoint::open(path("ckpt"));
  EXPECT_EQ(fs::path(ckpt.file_of("huge").path()).filename(), "model-00002-of-00003.safetensors");
  EXPECT_EQ(ckpt.file_of("huge").size(), 1u);
}

TEST_F(SafetensorsTest, SingleFileCheckpointReplacesEarlierShards) {
  const auto tensors = five_tensors();
  const std::string folder = path("ckpt");
  write_checkpoint(folder, as_named(tensors), {}, 100);
  const auto written = write_checkpoint(folder, as_named(tensors));
  EXPECT_EQ(written, (std::vector<std::string>{"model.safetensors"}));
  EXPECT_EQ(listing(folder), (std::set<std::string>{"model.safetensors"}));
  const auto ckpt = Checkpoint::open(folder);
  EXPECT_FALSE(ckpt.sharded());
  for (const auto& t : tensors) expect_same(ckpt.view(t.name), t);

  // And back to shards: the single file goes away.
  write_checkpoint(folder, as_named(tensors), {}, 100);
  EXPECT_EQ(listing(folder).count("model.safetensors"), 0u);
  EXPECT_TRUE(Checkpoint::open(folder).sharded());
}

TEST_F(SafetensorsTest, CheckpointRejectsMissingShard) {
  const std::string folder = path("ckpt");
  write_checkpoint(folder, as_named(five_tensors()), {}, 100);
  fs::remove(folder + "/model-00002-of-00003.safetensors");
  expect_input_error([&] { Checkpoint::open(folder); },
                     {"model.safetensors.index.json", "'model-00002-of-00003.safetensors'",
                      "'layers.1.a'", "do not exist"});
}

TEST_F(SafetensorsTest, CheckpointRejectsIndexThatDisagreesWithShards) {
  const std::string folder = path("ckpt");
  write_checkpoint(folder, as_named(five_tensors()), {}, 100);
  const std::string index_path = folder + "/model.safetensors.index.json";
  auto index = nlohmann::json::parse(read_bytes(index_path));
  index["weight_map"]["layers.1.a"] = "model-00001-of-00003.safetensors";
  index["weight_map"].erase("layers.0.a");
  write_bytes(index_path, index.dump());
  expect_input_error(
      [&] { Checkpoint::open(folder); },
      {"index and shards disagree (3 problems)",
       "tensor 'layers.1.a' is mapped to 'model-00001-of-00003.safetensors' but that shard does "
       "not contain it",
       "shard 'model-00001-of-00003.safetensors' contains tensor 'layers.0.a', which weight_map "
       "does not list",
       "shard 'model-00002-of-00003.safetensors' contains tensor 'layers.1.a', which weight_map "
       "assigns to 'model-00001-of-00003.safetensors'"});
}

TEST_F(SafetensorsTest, CheckpointRejectsMalformedIndex) {
  const std::string folder = path("ckpt");
  fs::create_directories(folder);
  const std::string index_path = folder + "/model.safetensors.index.json";
  write_bytes(index_path, R"({"metadata": {}, "weight_map": {"a": "../model.safetensors"}})");
  expect_input_error([&] { Checkpoint::open(folder); },
                     {"field 'weight_map.a'", "must be a plain file name"});
  write_bytes(index_path, R"({"metadata": {"total_size": -3}, "weight_map": {"a": "x"}})");
  expect_input_error([&] { Checkpoint::open(folder); },
                     {"field 'metadata.total_size'", "found integer -3"});
  write_bytes(index_path, R"({"metadata": {}})");
  expect_input_error([&] { Checkpoint::open(folder); },
                     {"missing required field 'weight_map'"});
  write_bytes(index_path, R"({"weight_map": {"a": 1}})");
  expect_input_error([&] { Checkpoint::open(folder); },
                     {"field 'weight_map.a': expected a shard file name, found integer 1"});
  write_bytes(index_path, R"({"weight_map": {"a": "x",}})");
  expect_input_error([&] { Checkpoint::open(folder); },
                     {"model.safetensors.index.json:1:", "invalid JSON"});
}

TEST_F(SafetensorsTest, CheckpointFolderMustHoldExactlyOneLayout) {
  const std::string folder = path("ckpt");
  fs::create_directories(folder);
  write_bytes(folder + "/pytorch_model.bin", "x");
  write_bytes(folder + "/config.json", "{}");
  expect_input_error([&] { Checkpoint::open(folder); },
                     {"neither model.safetensors nor model.safetensors.index.json",
                      "found: config.json, pytorch_model.bin"});
  write_checkpoint(folder, as_named(five_tensors()), {}, 100);
  write_safetensors(folder + "/model.safetensors", as_named(five_tensors()));
  expect_input_error([&] { Checkpoint::open(folder); }, {"both", "ambiguous"});
  expect_input_error([&] { Checkpoint::open(path("absent")); }, {"absent", "does not exist"});
}

TEST_F(SafetensorsTest, CheckpointWriterRejectsDuplicatesAcrossShards) {
  auto tensors = five_tensors();
  tensors.back().name = tensors.front().name;
  expect_input_error([&] { write_checkpoint(path("ckpt"), as_named(tensors), {}, 100); },
                     {"'layers.0.a'", "occurs twice"});
  EXPECT_FALSE(fs::exists(path("ckpt")));
}

}  // namespace
}  // namespace peftfw::io
