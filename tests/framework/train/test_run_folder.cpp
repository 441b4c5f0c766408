// The run folder: what peftfw owns in it, when clearing is refused, stale temporaries of a
// killed process, and the lock that keeps a second run out.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>

#include "../../common/expect_error.hpp"
#include "peftfw/io/fs.hpp"
#include "peftfw/train/run_folder.hpp"

using namespace peftfw;
namespace fs = std::filesystem;

namespace {

fs::path fresh(const std::string& name) {
  auto d = fs::temp_directory_path() / ("peftfw_runfolder_" + name + "_" + std::to_string(::getpid()));
  io::remove_tree(d);
  fs::create_directories(d);
  return d;
}

void touch(const fs::path& p) {
  fs::create_directories(p.parent_path());
  std::ofstream(p) << "x";
}

// A process id that no process has now (a child that has exited and been reaped).
long dead_pid() {
  const pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  ::waitpid(child, nullptr, 0);
  return child;
}

bool has(const std::vector<std::string>& v, const std::string& x) { return std::find(v.begin(), v.end(), x) != v.end(); }

TEST(RunFolder, OwnedAndForeignEntries) {
  auto d = fresh("classify");
  touch(d / train::kRunMarkerFile);
  touch(d / "metrics.jsonl");
  touch(d / "checkpoints/step-00000004/state.json");
  touch(d / "peft/adapter_config.json");
  touch(d / "gguf/model.gguf");  // not a format of this run, and not in the marker
  touch(d / "thesis.tex");
  touch(d / "checkpoints/my_notes.txt");
  fs::create_directory_symlink(fs::temp_directory_path(), d / "metrics.csv");
  auto c = train::inspect_run_folder(d, {"peft"});
  EXPECT_TRUE(c.is_run);
  EXPECT_TRUE(c.has_checkpoints);
  EXPECT_TRUE(has(c.foreign, "thesis.tex"));
  EXPECT_TRUE(has(c.foreign, "gguf"));
  EXPECT_TRUE(has(c.foreign, "checkpoints/my_notes.txt"));
  EXPECT_TRUE(has(c.foreign, "metrics.csv (a symbolic link)"));
  EXPECT_EQ(c.foreign.size(), 4u);
  // checkpoints/ holds a foreign file, so it is not owned as a whole.
  std::vector<std::string> owned;
  for (const auto& p : c.owned) owned.push_back(p.filename().string());
  EXPECT_EQ(owned, (std::vector<std::string>{"metrics.jsonl", "peft", train::kRunMarkerFile}));
  peftfw::testing::expect_input_error([&] { train::check_clearable(d, c, {}, "output.overwrite = true"); },
                              {"output.overwrite = true", d.string(), "thesis.tex", "4 entries"});
  io::remove_tree(d);
}

// `peftfw eval` writes RUN/eval/results.json: that folder is peftfw's, unless it holds anything else.
TEST(RunFolder, EvalResultsAreOwnedAndOtherEvalFilesForeign) {
  auto d = fresh("eval_results");
  touch(d / train::kRunMarkerFile);
  touch(d / "eval/results.json");
  auto c = train::inspect_run_folder(d, {"peft"});
  EXPECT_TRUE(c.foreign.empty());
  EXPECT_TRUE(std::find(c.owned.begin(), c.owned.end(), d / "eval") != c.owned.end());
  touch(d / "eval/my_plots.ipynb");
  c = train::inspect_run_folder(d, {"peft"});
  EXPECT_TRUE(has(c.foreign, "eval/my_plots.ipynb"));
  EXPECT_TRUE(std::find(c.owned.begin(), c.owned.end(), d / "eval") == c.owned.end());
}

TEST(RunFolder, ClearingDeletesOnlyWhatPeftfwMadeAndNeverFollowsLinks) {
  auto d = fresh("clear");
  auto outside = fresh("clear_outside");
  touch(outside / "precious.bin");
  touch(d / train::kRunMarkerFile);
  touch(d / "recipe.resolved.toml");
  touch(d / "checkpoints/step-00000002/state.json");
  fs::create_directory_symlink(outside, d / "checkpoints/step-00000002/link");
  touch(d / "merged/model.safetensors");
  auto c = train::inspect_run_folder(d, {"merged"});
  EXPECT_TRUE(c.foreign.empty());
  train::check_clearable(d, c, {}, "test");
  train::clear_run_folder(c);
  EXPECT_TRUE(fs::exists(d / train::kRunMarkerFile));  // kept: it carries the lock
  EXPECT_FALSE(fs::exists(d / "checkpoints"));
  EXPECT_FALSE(fs::exists(d / "merged"));
  EXPECT_TRUE(fs::exists(outside / "precious.bin"));
  io::remove_tree(d);
  io::remove_tree(outside);
}

TEST(RunFolder, RefusesFoldersThatAreNoRunOrHoldInputsOrTheWorkingDirectory) {
  auto d = fresh("refuse");
  touch(d / "data.jsonl");
  auto c = train::inspect_run_folder(d, {});
  EXPECT_FALSE(c.is_run);
  peftfw::testing::expect_input_error([&] { train::check_clearable(d, c, {}, "why"); },
                              {"not a peftfw run folder", "data.jsonl"});
  auto run = fresh("refuse_run");
  touch(run / train::kRunMarkerFile);
  touch(run / "split.json");
  auto rc = train::inspect_run_folder(run, {});
  peftfw::testing::expect_input_error([&] { train::check_clearable(run, rc, {run / "split.json"}, "why"); },
                              {"holds this run's inputs", (run / "split.json").string()});
  const auto cwd = fs::current_path();
  fs::create_directories(run / "checkpoints/step-00000001");
  fs::current_path(run / "checkpoints/step-00000001");
  rc = train::inspect_run_folder(run, {});
  peftfw::testing::expect_input_error([&] { train::check_clearable(run, rc, {}, "why"); },
                              {"contains the working directory"});
  fs::current_path(cwd);
  io::remove_tree(d);
  io::remove_tree(run);
}

TEST(RunFolder, StaleTemporariesRemovedAndAHalfReplacedFolderRestored) {
  auto d = fresh("stale");
  const auto dead = std::to_string(dead_pid()), live = std::to_string(::getpid());
  touch(d / ("checkpoints/.step-00000006.tmp-" + dead) / "trainable.safetensors");
  touch(d / ("metrics.jsonl.tmp." + dead));
  touch(d / ("checkpoints/.best.old-" + dead) / "trainable.safetensors");  // best itself is gone
  touch(d / ("checkpoints/.step-00000008.tmp-" + live) / "x");             // a live writer's: kept
  const auto done = train::remove_stale_temporaries(d);
  EXPECT_EQ(done.size(), 3u);
  EXPECT_FALSE(fs::exists(d / ("checkpoints/.step-00000006.tmp-" + dead)));
  EXPECT_FALSE(fs::exists(d / ("metrics.jsonl.tmp." + dead)));
  EXPECT_TRUE(fs::exists(d / "checkpoints/best/trainable.safetensors"));
  EXPECT_TRUE(fs::exists(d / ("checkpoints/.step-00000008.tmp-" + live)));
  io::remove_tree(d);
}

TEST(RunFolder, LockKeepsASecondRunOut) {
  auto d = fresh("lock");
  {
    train::RunFolderLock first(d, {"peft"});
    try {
      train::RunFolderLock second(d, {"peft"});
      ADD_FAILURE() << "a second lock on the same run folder was granted";
    } catch (const RuntimeError& e) {
      EXPECT_NE(std::string(e.what()).find("another peftfw process"), std::string::npos) << e.what();
    }
  }
  train::RunFolderLock again(d, {"merged"});  // released with the first
  std::ifstream f(d / train::kRunMarkerFile);
  const std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  EXPECT_NE(text.find("\"peft\""), std::string::npos) << text;
  EXPECT_NE(text.find("\"merged\""), std::string::npos) << text;
  io::remove_tree(d);
}

}  // namespace
