// File-system helpers that avoid std::filesystem::remove_all.
//
// The pip LibTorch wheels export their own statically linked copy of parts of
// libstdc++'s std::filesystem (pytorch/pytorch#133437). Where the wheel was
// built with another GCC than peftfw (the GPU machine: torch 2.11 wheel, GCC 13),
// the dynamic linker can bind remove_all's directory walk to that copy and it
// crashes on a non-empty folder. These use POSIX nftw instead.
#pragma once

#include <filesystem>

namespace peftfw::io {

// Deletes `path` and everything below it; a missing path is fine. Returns false on failure.
bool remove_tree(const std::filesystem::path& path) noexcept;

// As remove_tree, but throws RuntimeError naming the path on failure.
void remove_tree_or_throw(const std::filesystem::path& path);

}  // namespace peftfw::io
