// The run folder's training record: metrics.jsonl and metrics.csv (one row per
// optimizer step, eval rows when evaluated) and loss.svg (train/eval loss and
// learning rate), rewritten at every evaluation.
#pragma once

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <vector>

namespace peftfw::train {

class MetricsLog {
 public:
  // Appends to existing files when resuming.
  MetricsLog(const std::filesystem::path& run_dir, bool resuming);
  // gpu_peak_gib < 0: not on a GPU (left out of the record)
  void step(int64_t step, int64_t epoch, double loss, double lr, double grad_norm, double tokens_per_s,
            double gpu_peak_gib = -1.0);
  void eval(int64_t step, double loss);
  void finish() { write_svg(); }

 private:
  void write_svg() const;
  std::filesystem::path dir_;
  std::ofstream jsonl_, csv_;
  std::vector<std::pair<int64_t, double>> train_loss_, eval_loss_, lr_;
};

}  // namespace peftfw::train
