// File-system helpers (see fs.hpp for why they exist).
#include "peftfw/io/fs.hpp"

#include <ftw.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "peftfw/error.hpp"

namespace peftfw::io {

namespace {
int remove_entry(const char* path, const struct stat*, int, struct FTW*) { return ::remove(path); }
}  // namespace

bool remove_tree(const std::filesystem::path& path) noexcept {
  if (::nftw(path.c_str(), remove_entry, 16, FTW_DEPTH | FTW_PHYS) == 0) return true;
  return errno == ENOENT;
}

void remove_tree_or_throw(const std::filesystem::path& path) {
  if (!remove_tree(path))
    throw RuntimeError("cannot delete " + path.string() + ": " + std::strerror(errno));
}

}  // namespace peftfw::io
