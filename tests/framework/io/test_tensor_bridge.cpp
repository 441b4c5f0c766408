// Tests for peftfw/io/tensor_bridge: dtype mapping checked against known bit
// patterns (1.0 in BF16 is 0x3F80, in F16 0x3C00), round trips through files,
// non-contiguous input, and the errors for unsavable tensors.
#include "peftfw/io/fs.hpp"
#include "peftfw/io/tensor_bridge.hpp"

#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "peftfw/error.hpp"

namespace peftfw::io {
namespace {

namespace fs = std::filesystem;

class TensorBridgeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "peftfw_bridge_XXXXXX").string();
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { peftfw::io::remove_tree(dir_); }
  std::string path(const std::string& name) const { return dir_ + "/" + name; }
  std::string dir_;
};

bool same_bytes(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
  const auto ca = a.contiguous(), cb = b.contiguous();
  return std::memcmp(ca.data_ptr(), cb.data_ptr(), ca.nbytes()) == 0;
}

TEST_F(TensorBridgeTest, ViewsBecomeTensorsOfTheRightType) {
  const uint8_t bf16_one_and_minus_two[] = {0x80, 0x3F, 0x00, 0xC0};
  const auto bf16 = to_tensor({DType::BF16, {2}, bf16_one_and_minus_two, 4}, "bf16");
  EXPECT_EQ(bf16.scalar_type(), torch::kBFloat16);
  EXPECT_EQ(bf16[0].item<float>(), 1.0f);
  EXPECT_EQ(bf16[1].item<float>(), -2.0f);

  const uint8_t f16_one[] = {0x00, 0x3C};
  const auto f16 = to_tensor({DType::F16, {}, f16_one, 2}, "f16");
  EXPECT_EQ(f16.scalar_type(), torch::kFloat16);
  EXPECT_EQ(f16.dim(), 0);
  EXPECT_EQ(f16.item<float>(), 1.0f);

  const uint8_t i16[] = {0xFE, 0xFF, 0x02, 0x01};  // -2, 258 little-endian
  const auto ints = to_tensor({DType::I16, {2, 1}, i16, 4}, "i16");
  EXPECT_EQ(ints.scalar_type(), torch::kInt16);
  EXPECT_EQ(ints[0][0].item<int>(), -2);
  EXPECT_EQ(ints[1][0].item<int>(), 258);

  const uint8_t bools[] = {0, 1, 1};
  const auto b = to_tensor({DType::BOOL, {3}, bools, 3}, "b");
  EXPECT_EQ(b.scalar_type(), torch::kBool);
  EXPECT_TRUE(b[1].item<bool>());
  EXPECT_FALSE(b[0].item<bool>());

  const uint8_t bad_bool[] = {0, 2};
  try {
    to_tensor({DType::BOOL, {2}, bad_bool, 2}, "m.safetensors: tensor 'mask'");
    ADD_FAILURE() << "expected InputError";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("m.safetensors: tensor 'mask': BOOL element 1"),
              std::string::npos)
        << e.what();
  }
  const auto empty = to_tensor({DType::F32, {0, 3}, nullptr, 0}, "e");
  EXPECT_EQ(empty.sizes(), (std::vector<int64_t>{0, 3}));
}

TEST_F(TensorBridgeTest, EveryDTypeRoundTripsThroughAFile) {
  torch::manual_seed(0);
  std::map<std::string, at::Tensor> tensors;
  const std::vector<c10::ScalarType> types = {torch::kFloat64, torch::kFloat32, torch::kFloat16,
                                              torch::kBFloat16, torch::kInt64, torch::kInt32,
                                              torch::kInt16, torch::kInt8, torch::kUInt8,
                                              torch::kBool};
  for (const auto type : types) {
    const std::string name = std::string("t.") + c10::toString(type);
    tensors[name] = (torch::randn({3, 4}) * 50).to(type);
    tensors[name + ".scalar"] = torch::ones({}, torch::kFloat32).to(type);
  }
  // Non-contiguous and on a storage offset: saved as its logical contents.
  const auto base = torch::arange(24, torch::kFloat32).reshape({4, 6});
  tensors["transposed"] = base.t();
  tensors["sliced"] = base.index({torch::indexing::Slice(1, 3)});
  tensors["requires_grad"] = torch::randn({2}, torch::requires_grad());

  save_tensors(path("m.safetensors"), tensors, {{"format", "pt"}});
  const auto loaded = load_checkpoint_tensors(path("m.safetensors"));
  ASSERT_EQ(loaded.size(), tensors.size());
  for (const auto& [name, t] : tensors) {
    ASSERT_TRUE(loaded.count(name)) << name;
    EXPECT_TRUE(same_bytes(loaded.at(name), t.detach())) << name;
  }
  EXPECT_TRUE(torch::equal(loaded.at("transposed"), base.t()));
  EXPECT_EQ(SafetensorsFile::open(path("m.safetensors")).metadata().at("format"), "pt");
}

TEST_F(TensorBridgeTest, ShardedCheckpointRoundTrips) {
  std::map<std::string, at::Tensor> tensors;
  for (int i = 0; i < 6; ++i) {
    tensors["model.layers." + std::to_string(i) + ".weight"] = torch::randn({8, 8});
  }
  const auto written = save_checkpoint_tensors(path("ckpt"), tensors, {}, 600);
  EXPECT_EQ(written.size(), 4u);  // 256 bytes each, two per shard, plus the index
  const auto loaded = load_checkpoint_tensors(path("ckpt"));
  for (const auto& [name, t] : tensors) EXPECT_TRUE(same_bytes(loaded.at(name), t)) << name;
}

TEST_F(TensorBridgeTest, RejectsTensorsSafetensorsCannotHold) {
  try {
    tensor_bytes("z", torch::zeros({2}, torch::kComplexFloat));
    ADD_FAILURE() << "expected InputError";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("cannot save tensor 'z': dtype ComplexFloat"),
              std::string::npos)
        << e.what();
  }
  EXPECT_THROW(tensor_bytes("u", at::Tensor()), InputError);
}

}  // namespace
}  // namespace peftfw::io
