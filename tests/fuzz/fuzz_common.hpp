// What every fuzz target shares: the rule for exceptions and a scratch folder.
//
// Bad input must end in a peftfw::Error (InputError, exit code 2; RuntimeError
// for a failure while working) whose message stays short. Any other exception
// (std::out_of_range, nlohmann::json::type_error, std::bad_alloc, ...) leaves
// LLVMFuzzerTestOneInput, terminates the process, and libFuzzer saves the input
// as a crash: in the CLI it would be an unexplained failure.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>

#include "peftfw/error.hpp"

namespace peftfw::fuzz {

// A message longer than this quotes too much of the input (excerpts are cut to
// 200 bytes, recipes list at most 50 diagnostics).
inline constexpr std::size_t kMaxMessageBytes = 64 * 1024;

// Runs `parse`; a peftfw::Error is the expected outcome of bad input, as long
// as its message is bounded.
template <typename Parse>
void expect_clean(Parse&& parse) {
  try {
    parse();
  } catch (const peftfw::Error& e) {
    const std::size_t n = std::strlen(e.what());
    if (n > kMaxMessageBytes) {
      std::fprintf(stderr, "fuzz: error message of %zu bytes (limit %zu); it starts: %.300s\n", n,
                   kMaxMessageBytes, e.what());
      std::abort();
    }
  }
}

// Fails the run (libFuzzer saves the input) when a property does not hold.
inline void require(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz: property violated: %s\n", what);
    std::abort();
  }
}

// A private scratch folder for targets that need files, made once per process
// and removed at exit. The name lives on the heap (never freed) so that it
// outlives static destructors, which run before this atexit handler.
inline const std::string& scratch_dir() {
  static const std::string* const dir = [] {
    char templ[] = "/tmp/peftfw-fuzz-XXXXXX";
    if (::mkdtemp(templ) == nullptr) {
      std::perror("fuzz: mkdtemp");
      std::abort();
    }
    const auto* made = new std::string(templ);
    std::atexit([] {
      std::error_code ec;
      std::filesystem::remove_all(scratch_dir(), ec);
    });
    return made;
  }();
  return *dir;
}

inline void write_file(const std::string& path, const char* data, std::size_t size) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr || std::fwrite(data, 1, size, f) != size || std::fclose(f) != 0) {
    std::perror(("fuzz: cannot write " + path).c_str());
    std::abort();
  }
}

}  // namespace peftfw::fuzz
