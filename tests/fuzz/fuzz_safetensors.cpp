// Fuzz target: the safetensors reader (framework/src/io/safetensors.cpp).
// The input is a whole .safetensors file; it is parsed from memory so that
// AddressSanitizer sees every read past its end (a memory map would hide reads
// within the last page). A file that opens must give views inside the input,
// whose byte counts match their shapes.
#include <cstddef>
#include <cstdint>
#include <string>

#include "fuzz_common.hpp"
#include "peftfw/io/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  using namespace peftfw;
  fuzz::expect_clean([&] {
    const io::SafetensorsFile file =
        io::SafetensorsFile::from_bytes("fuzz.safetensors", data, size);
    std::size_t total = 0;
    for (const std::string& name : file.names()) {
      const io::TensorView view = file.view(name);
      fuzz::require(view.data >= data && view.nbytes <= size &&
                        view.data + view.nbytes <= data + size,
                    "a view lies inside the file");
      const int64_t numel = view.numel();
      fuzz::require(static_cast<uint64_t>(numel) * io::dtype_size(view.dtype) == view.nbytes,
                    "numel x dtype size == nbytes");
      // Touch the first and last byte: ASan reports any read outside the input.
      if (view.nbytes > 0) total += view.data[0] + view.data[view.nbytes - 1];
      io::shape_to_string(view.shape);
    }
    for (const auto& [key, value] : file.metadata()) total += key.size() + value.size();
    fuzz::require(file.size() == file.names().size(), "size() == names().size()");
    (void)total;
  });
  return 0;
}
