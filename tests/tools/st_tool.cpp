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

#include "peftfw/data/dataset.hpp"
#include "peftfw/error.hpp"
#include "peftfw/io/safetensors.hpp"

namespace {

int dump(const std::string& path) {
  const auto file = peftfw::io::SafetensorsFile::open(path);
  nlohmann::json out = nlohmann::json::object();
  out["__metadata__"] = file.metadata();
  for (const auto& name : file.names()) {
    const auto view = file.view(name);
    out[name] = {{"dtype", peftfw::io::dtype_name(view.dtype)},
                 {"shape", view.shape},
                 {"sha256", peftfw::data::sha256_hex(std::string_view(
                                reinterpret_cast<const char*>(view.data), view.nbytes))}};
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
