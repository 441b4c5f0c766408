// The run folder of `peftfw run`: what in it peftfw made, when it may be
// cleared, and the lock that keeps two runs out of one folder.
//
// peftfw deletes nothing it did not make. A run folder carries a marker file
// (peftfw_run.json); only a marked folder is ever cleared, and only the
// entries whose names peftfw writes (recipe.resolved.toml, checkpoints/, the
// export folders, ...). Anything else in the folder, the working directory,
// or a folder holding one of the run's inputs stops the clearing with a list
// of what is in the way. Symbolic links are never followed.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

namespace peftfw::train {

inline constexpr const char* kRunMarkerFile = "peftfw_run.json";

struct RunFolderContents {
  bool exists = false;
  bool empty = true;
  bool is_run = false;                           // holds the marker (or a run_identity.json of older runs)
  bool has_checkpoints = false;                  // a complete checkpoints/step-* folder
  std::vector<std::filesystem::path> owned;      // entries peftfw made (top level)
  std::vector<std::string> foreign;              // entries it did not make, relative to the folder
};

// The complete checkpoints (checkpoints/step-N folders with a state.json), oldest first.
std::vector<std::filesystem::path> list_checkpoints(const std::filesystem::path& run_dir);

// Classifies the entries of `run_dir`. `formats` are the export folder names of this
// peftfw (every persistence plugin id); the marker's own list of formats is added.
RunFolderContents inspect_run_folder(const std::filesystem::path& run_dir,
                                     const std::vector<std::string>& formats);

// Throws InputError when `run_dir` may not be cleared: it is not a peftfw run folder,
// it holds entries peftfw did not make, it is (or contains) the working directory,
// or it contains one of `inputs` (recipe, data, model, tokenizer files). `why` says
// what asked for the clearing (e.g. "output.overwrite = true").
void check_clearable(const std::filesystem::path& run_dir, const RunFolderContents& contents,
                     const std::vector<std::filesystem::path>& inputs, const std::string& why);

// Deletes the entries `contents.owned` lists but the marker (never following a symbolic link).
void clear_run_folder(const RunFolderContents& contents);

// Exclusive lock on the run folder's marker, held for the life of the object. Creates
// the folder and the marker (recording `formats`) when absent. Throws RuntimeError
// naming the folder when another process holds the lock.
class RunFolderLock {
 public:
  RunFolderLock(const std::filesystem::path& run_dir, const std::vector<std::string>& formats);
  ~RunFolderLock();
  RunFolderLock(const RunFolderLock&) = delete;
  RunFolderLock& operator=(const RunFolderLock&) = delete;

 private:
  int fd_ = -1;
};

// Removes what a killed peftfw process left behind in the run folder and its
// checkpoints/ folder: temporary files and folders of atomic writes. A folder caught
// between the two renames of an atomic replacement (only `.NAME.old-PID` left) is put
// back. Call with the lock held. Returns the entries removed or restored, for the log.
std::vector<std::string> remove_stale_temporaries(const std::filesystem::path& run_dir);

}  // namespace peftfw::train
