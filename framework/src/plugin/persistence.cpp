// Shared helpers for persistence plugins.
#include "peftfw/plugin/persistence.hpp"

#include <unistd.h>

#include "peftfw/error.hpp"
#include "peftfw/plugin/adapter.hpp"
#include "peftfw/io/fs.hpp"

namespace fs = std::filesystem;

namespace peftfw {

void refuse_if_weights_cannot_hold(const AdapterMethod& method, const std::string& format) {
  if (method.attaches != AdapterAttach::kState) return;
  throw InputError("[output] formats includes \"" + format + "\", but method '" + method.name +
                   "' learns an SSM state (" + method.summary +
                   ") No weight of the checkpoint can hold it exactly, so the export would drop it. "
                   "Use formats = [\"peft\"] (peftfw forward/eval and [adapter] init_from load it).");
}

void write_folder_atomic(const fs::path& dir, const std::function<void(const fs::path&)>& fill) {
  const auto pid = std::to_string(::getpid());
  const fs::path parent = dir.has_parent_path() ? dir.parent_path() : fs::path(".");
  const fs::path tmp = parent / ("." + dir.filename().string() + ".tmp-" + pid);
  const fs::path old = parent / ("." + dir.filename().string() + ".old-" + pid);
  std::error_code ec;
  fs::create_directories(parent, ec);
  io::remove_tree(tmp);
  fs::create_directories(tmp, ec);
  if (ec) throw RuntimeError("cannot create " + tmp.string() + ": " + ec.message());
  try {
    fill(tmp);
  } catch (...) {
    io::remove_tree(tmp);
    throw;
  }
  const bool existed = fs::exists(dir);
  if (existed) {
    fs::rename(dir, old, ec);
    if (ec) {
      io::remove_tree(tmp);
      throw RuntimeError("cannot replace " + dir.string() + ": " + ec.message());
    }
  }
  fs::rename(tmp, dir, ec);
  if (ec) {
    if (existed) fs::rename(old, dir);
    io::remove_tree(tmp);
    throw RuntimeError("cannot move " + tmp.string() + " to " + dir.string() + ": " + ec.message());
  }
  if (existed) io::remove_tree(old);
}

}  // namespace peftfw
