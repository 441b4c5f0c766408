// The binary contract between peftfw and a plugin shared library.
//
// A plugin exports exactly one C symbol, `peftfw_plugin_entry_v1`, returning a
// manifest. peftfw reads the manifest's plain-C fields (ABI version, LibTorch
// version, compiler) BEFORE any C++ object crosses the library boundary; only
// when all of them match does it call `register_plugin`, which hands the
// plugin's factories to the registry. Registration is an explicit call, never
// a static initialiser, and exceptions never cross the boundary: the macro
// below catches them and reports the message through the error buffer.
#pragma once

#include <cstddef>
#include <cstdint>

#define PEFTFW_PLUGIN_ABI_VERSION 3u  // 3: adapter phases, persistence hooks and SSM slots (2: methods, keys, counting)
#define PEFTFW_PLUGIN_ENTRY_SYMBOL "peftfw_plugin_entry_v1"

#define PEFTFW_STRINGIFY_INNER(x) #x
#define PEFTFW_STRINGIFY(x) PEFTFW_STRINGIFY_INNER(x)

// Compiler identity: plugins pass C++ objects (std::string, std::shared_ptr,
// torch::Tensor) across the boundary, so the standard library ABI must agree.
#if defined(__clang__)
#define PEFTFW_COMPILER_FAMILY "clang"
#elif defined(__GNUC__)
#define PEFTFW_COMPILER_FAMILY "gcc"
#else
#define PEFTFW_COMPILER_FAMILY "unknown"
#endif
#if defined(_GLIBCXX_USE_CXX11_ABI)
#define PEFTFW_CXX_ABI "libstdc++ cxx11abi=" PEFTFW_STRINGIFY(_GLIBCXX_USE_CXX11_ABI)
#else
#define PEFTFW_CXX_ABI "other-stdlib"
#endif
#define PEFTFW_COMPILER_ID PEFTFW_COMPILER_FAMILY "/" PEFTFW_CXX_ABI

#if defined(_WIN32)
#define PEFTFW_PLUGIN_EXPORT __declspec(dllexport)
#else
#define PEFTFW_PLUGIN_EXPORT __attribute__((visibility("default")))
#endif

extern "C" {

struct peftfw_plugin_manifest {
  uint32_t abi_version;        // must equal PEFTFW_PLUGIN_ABI_VERSION of the host
  const char* id;              // unique plugin id, e.g. "mamba2"
  const char* kind;            // "architecture" | "adapter" | "persistence"
  const char* version;         // the plugin's own version string
  const char* torch_version;   // LibTorch version the plugin was compiled against
  const char* compiler;        // PEFTFW_COMPILER_ID of the plugin build
  const char* description;     // one line for `peftfw plugins`
  // Called once, after all checks passed. `registrar` is a peftfw::PluginRegistrar*.
  // Returns 0 on success; otherwise writes a NUL-terminated message into `error`.
  int (*register_plugin)(void* registrar, char* error, size_t error_size);
};

typedef const peftfw_plugin_manifest* (*peftfw_plugin_entry_fn)(void);
}
