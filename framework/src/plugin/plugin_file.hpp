// What a plugin file or folder must pass before peftfw hands it to dlopen.
//
// dlopen maps segments straight from the file, so a segment running past the end of a
// truncated copy is mapped anyway and the loader's first touch of a missing page kills the
// process with SIGBUS. Each candidate is therefore examined with plain file I/O first: what it
// is (a regular file, not a folder, pipe or broken link), who could have written it or its
// folder (ssh's rule for keys: only this user or root), and whether its ELF structure fits the
// file and this process.
#pragma once

#include <filesystem>
#include <optional>
#include <string>

namespace peftfw::plugin_file {

// Why `file` (a plugin folder's entry or a file given directly) must not reach dlopen, or
// nullopt when it may.
std::optional<std::string> check_candidate(const std::filesystem::path& file);

// Why the plugin folder `folder` must not be searched (not a folder, writable by others,
// unexaminable), or nullopt when it may. A folder that does not exist sets `missing` and
// returns nullopt: a missing search folder is not an error.
std::optional<std::string> check_folder(const std::filesystem::path& folder, bool& missing);

}  // namespace peftfw::plugin_file
