// The run folder: ownership, clearing, locking and stale temporaries (see run_folder.hpp).
#include "peftfw/train/run_folder.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <regex>
#include <set>

#include "peftfw/error.hpp"
#include "peftfw/io/fs.hpp"

namespace fs = std::filesystem;

namespace peftfw::train {

namespace {

// The files and folders `peftfw run` writes at the top of a run folder, besides the
// export folders (one per [output] formats entry).
const std::set<std::string>& run_file_names() {
  static const std::set<std::string> names = {
      kRunMarkerFile, "recipe.resolved.toml", "run_identity.json", "split.json", "metrics.jsonl",
      "metrics.csv",  "loss.svg",             "checkpoints",       "eval",
      "adapter_state.safetensors", "train_summary.json"};
  return names;
}

// A temporary of an atomic write, and the name it stands for:
//   .NAME.tmp-PID / .NAME.old-PID   (write_folder_atomic)
//   NAME.tmp.PID                    (io::write_file_atomic)
struct Temporary {
  std::string name;
  bool old_copy = false;  // .NAME.old-PID: the previous version moved aside
  long pid = 0;
};

std::optional<Temporary> parse_temporary(const std::string& entry) {
  static const std::regex folder_tmp(R"(^\.(.+)\.(tmp|old)-([0-9]{1,9})$)");
  static const std::regex file_tmp(R"(^(.+)\.tmp\.([0-9]{1,9})$)");
  std::smatch m;
  if (std::regex_match(entry, m, folder_tmp)) return Temporary{m[1], m[2] == "old", std::stol(m[3])};
  if (std::regex_match(entry, m, file_tmp)) return Temporary{m[1], false, std::stol(m[2])};
  return std::nullopt;
}

bool is_checkpoint_name(const std::string& name) {
  static const std::regex step(R"(^step-[0-9]+$)");
  return name == "best" || std::regex_match(name, step);
}

bool process_alive(long pid) {
  if (pid == static_cast<long>(::getpid())) return true;
  return ::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM;
}

std::vector<std::string> marker_formats(const fs::path& run_dir) {
  std::ifstream f(run_dir / kRunMarkerFile);
  auto j = nlohmann::json::parse(f, nullptr, /*allow_exceptions=*/false);
  std::vector<std::string> out;
  if (j.is_object() && j.contains("formats") && j["formats"].is_array())
    for (const auto& v : j["formats"])
      if (v.is_string()) out.push_back(v.get<std::string>());
  return out;
}

// The part of `path` below `dir`, if `path` is `dir` or inside it (both made absolute,
// symbolic links resolved as far as they exist).
std::optional<fs::path> inside(const fs::path& path, const fs::path& dir) {
  std::error_code ec;
  const auto p = fs::weakly_canonical(fs::absolute(path), ec);
  const auto d = fs::weakly_canonical(fs::absolute(dir), ec);
  auto rel = p.lexically_relative(d);
  if (rel.empty() || *rel.begin() == "..") return std::nullopt;
  return rel;
}

std::string list_of(const std::vector<std::string>& items) {
  std::string out;
  for (size_t i = 0; i < items.size() && i < 20; ++i) out += "\n    " + items[i];
  if (items.size() > 20) out += "\n    ... and " + std::to_string(items.size() - 20) + " more";
  return out;
}

}  // namespace

std::vector<fs::path> list_checkpoints(const fs::path& run_dir) {
  std::vector<fs::path> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(run_dir / "checkpoints", ec)) {
    const auto name = e.path().filename().string();
    if (name.rfind("step-", 0) == 0 && is_checkpoint_name(name) && e.is_directory(ec) &&
        !e.is_symlink(ec) && fs::exists(e.path() / "state.json", ec))
      out.push_back(e.path());
  }
  std::sort(out.begin(), out.end());
  return out;
}

RunFolderContents inspect_run_folder(const fs::path& run_dir, const std::vector<std::string>& formats) {
  RunFolderContents c;
  std::error_code ec;
  const auto st = fs::symlink_status(run_dir, ec);
  if (ec || !fs::exists(st)) return c;
  c.exists = true;
  if (!fs::is_directory(st)) {
    c.empty = false;
    c.foreign.push_back(run_dir.string() + " (not a folder)");
    return c;
  }
  std::set<std::string> owned_names = run_file_names();
  owned_names.insert(formats.begin(), formats.end());
  for (const auto& f : marker_formats(run_dir)) owned_names.insert(f);
  c.is_run = fs::exists(run_dir / kRunMarkerFile, ec) || fs::exists(run_dir / "run_identity.json", ec);

  auto owned_entry = [&](const std::string& name) {
    if (owned_names.count(name)) return true;
    auto t = parse_temporary(name);
    return t && owned_names.count(t->name);
  };
  for (const auto& e : fs::directory_iterator(run_dir, ec)) {
    c.empty = false;
    const auto name = e.path().filename().string();
    const bool link = e.is_symlink(ec);
    if (link || !owned_entry(name)) {
      c.foreign.push_back(name + (link ? " (a symbolic link)" : ""));
      continue;
    }
    if (name == "checkpoints" && e.is_directory(ec)) {
      bool clean = true;
      for (const auto& k : fs::directory_iterator(e.path(), ec)) {
        const auto kn = k.path().filename().string();
        auto t = parse_temporary(kn);
        const bool ours = !k.is_symlink(ec) && (is_checkpoint_name(kn) || (t && is_checkpoint_name(t->name)));
        if (!ours) {
          c.foreign.push_back("checkpoints/" + kn + (k.is_symlink(ec) ? " (a symbolic link)" : ""));
          clean = false;
        }
      }
      if (!clean) continue;
    }
    if (name == "eval" && e.is_directory(ec)) {
      // `peftfw eval` writes eval/results.json there, and nothing else.
      bool clean = true;
      for (const auto& k : fs::directory_iterator(e.path(), ec)) {
        const auto kn = k.path().filename().string();
        auto t = parse_temporary(kn);
        if (k.is_symlink(ec) || (kn != "results.json" && !(t && t->name == "results.json"))) {
          c.foreign.push_back("eval/" + kn + (k.is_symlink(ec) ? " (a symbolic link)" : ""));
          clean = false;
        }
      }
      if (!clean) continue;
    } else if (name == "eval") {
      c.foreign.push_back(name);
      continue;
    }
    c.owned.push_back(e.path());
  }
  if (ec) throw RuntimeError("cannot list " + run_dir.string() + ": " + ec.message());
  std::sort(c.owned.begin(), c.owned.end());
  std::sort(c.foreign.begin(), c.foreign.end());
  c.has_checkpoints = !list_checkpoints(run_dir).empty();
  return c;
}

void check_clearable(const fs::path& run_dir, const RunFolderContents& c,
                     const std::vector<fs::path>& inputs, const std::string& why) {
  std::vector<std::string> problems;
  std::error_code ec;
  if (!c.is_run)
    problems.push_back("it is not a peftfw run folder (it has no " + std::string(kRunMarkerFile) +
                       "), and peftfw deletes only what it made");
  if (!c.foreign.empty())
    problems.push_back("it holds " + std::to_string(c.foreign.size()) +
                       " entries that peftfw did not make:" + list_of(c.foreign));
  if (auto rel = inside(fs::current_path(ec), run_dir))
    problems.push_back(rel->empty() || *rel == "." ? "it is the working directory"
                                                   : "it contains the working directory");
  std::vector<std::string> held;
  for (const auto& in : inputs)
    if (!in.empty() && inside(in, run_dir)) held.push_back(in.string());
  if (!held.empty()) problems.push_back("it holds this run's inputs:" + list_of(held));
  if (problems.empty()) return;
  std::string msg = why + ": refusing to clear " + run_dir.string() + ":";
  for (const auto& p : problems) msg += "\n  - " + p;
  throw InputError(msg + "\nChoose an empty or new folder with output.dir=DIR, or move those entries away.");
}

void clear_run_folder(const RunFolderContents& c) {
  // The marker stays: it carries the lock of the run that is clearing the folder.
  for (const auto& p : c.owned)
    if (p.filename() != kRunMarkerFile) io::remove_tree_or_throw(p);  // nftw with FTW_PHYS: links not followed
}

RunFolderLock::RunFolderLock(const fs::path& run_dir, const std::vector<std::string>& formats) {
  std::error_code ec;
  fs::create_directories(run_dir, ec);
  if (ec) throw RuntimeError("cannot create the run folder " + run_dir.string() + ": " + ec.message());
  const auto marker = (run_dir / kRunMarkerFile).string();
  fd_ = ::open(marker.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
  if (fd_ < 0)
    throw RuntimeError("cannot create " + marker + ": " + std::strerror(errno));
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    ::close(fd_);
    fd_ = -1;
    throw RuntimeError(run_dir.string() + ": another peftfw process is using this run folder (" +
                       std::string(err == EWOULDBLOCK ? "its lock is held" : std::strerror(err)) +
                       "); wait for it to finish, or choose another output.dir");
  }
  // Record every export folder name this run may write, so a later clearing knows them.
  auto all = marker_formats(run_dir);
  for (const auto& f : formats)
    if (std::find(all.begin(), all.end(), f) == all.end()) all.push_back(f);
  const std::string text =
      nlohmann::json{{"made_by", "peftfw"}, {"version", PEFTFW_VERSION}, {"formats", all}}.dump(1) + "\n";
  const bool ok = ::ftruncate(fd_, 0) == 0 &&
                  ::pwrite(fd_, text.data(), text.size(), 0) == static_cast<ssize_t>(text.size()) &&
                  ::fsync(fd_) == 0;
  if (!ok) {
    const int err = errno;
    ::close(fd_);
    fd_ = -1;
    throw RuntimeError("cannot write " + marker + ": " + std::strerror(err));
  }
}

RunFolderLock::~RunFolderLock() {
  if (fd_ >= 0) ::close(fd_);  // closing releases the flock
}

std::vector<std::string> remove_stale_temporaries(const fs::path& run_dir) {
  std::vector<std::string> done;
  for (const auto& dir : {run_dir, run_dir / "checkpoints"}) {
    std::error_code ec;
    std::vector<std::pair<fs::path, Temporary>> found;
    for (const auto& e : fs::directory_iterator(dir, ec))
      if (auto t = parse_temporary(e.path().filename().string()); t && !process_alive(t->pid))
        found.emplace_back(e.path(), *t);
    for (const auto& [path, t] : found) {
      const auto target = dir / t.name;
      if (t.old_copy && !fs::exists(fs::symlink_status(target, ec))) {
        fs::rename(path, target, ec);  // killed between the two renames: put the old one back
        if (ec) throw RuntimeError("cannot restore " + target.string() + " from " + path.string() + ": " + ec.message());
        done.push_back("restored " + target.string());
      } else {
        io::remove_tree_or_throw(path);
        done.push_back("removed " + path.string());
      }
    }
  }
  return done;
}

}  // namespace peftfw::train
