// The run folder's training record: metrics.jsonl and metrics.csv (one row per
// optimizer step, eval rows when evaluated) and loss.svg (train/eval loss and
// learning rate), rewritten at every evaluation.
#pragma once

#include <cstdint>
#include <filesystem>
#include <nlohmann/json_fwd.hpp>
#include <vector>

namespace peftfw::train {

class MetricsLog {
 public:
  // A new record, or (resume_step >= 0) the record of a run resumed from the checkpoint of
  // that step: rows after it (steps that will run again) and any torn last line are dropped,
  // so each step appears once and loss.svg covers the whole run.
  MetricsLog(const std::filesystem::path& run_dir, int64_t resume_step = -1);
  ~MetricsLog();
  MetricsLog(const MetricsLog&) = delete;
  MetricsLog& operator=(const MetricsLog&) = delete;
  // gpu_peak_gib < 0: not on a GPU (left out of the record)
  void step(int64_t step, int64_t epoch, double loss, double lr, double grad_norm, double tokens_per_s,
            double gpu_peak_gib = -1.0);
  void eval(int64_t step, double loss);
  void finish() { write_svg(); }

 private:
  void record(const nlohmann::json& row);  // appends to both files; RuntimeError naming the file on failure
  void remember(const nlohmann::json& row);
  void write_svg() const;
  std::filesystem::path dir_;
  int jsonl_fd_ = -1, csv_fd_ = -1;
  std::vector<std::pair<int64_t, double>> train_loss_, eval_loss_, lr_;
};

}  // namespace peftfw::train
