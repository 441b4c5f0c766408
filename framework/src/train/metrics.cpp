// metrics.jsonl, metrics.csv and loss.svg of a run.
#include "peftfw/train/metrics.hpp"

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <sstream>

#include "peftfw/error.hpp"
#include "peftfw/io/safetensors.hpp"

namespace fs = std::filesystem;

namespace peftfw::train {

MetricsLog::MetricsLog(const fs::path& run_dir, bool resuming) : dir_(run_dir) {
  const auto mode = resuming ? std::ios::app : std::ios::trunc;
  const bool csv_existed = resuming && fs::exists(run_dir / "metrics.csv");
  jsonl_.open(run_dir / "metrics.jsonl", std::ios::out | mode);
  csv_.open(run_dir / "metrics.csv", std::ios::out | mode);
  if (!jsonl_ || !csv_) throw RuntimeError("cannot write metrics files in " + run_dir.string());
  if (!csv_existed) csv_ << "kind,step,epoch,loss,lr,grad_norm,tokens_per_s\n";
}

void MetricsLog::step(int64_t step, int64_t epoch, double loss, double lr, double grad_norm, double tps,
                      double gpu_peak_gib) {
  nlohmann::json j = {{"kind", "train"}, {"step", step},           {"epoch", epoch},
                      {"loss", loss},    {"lr", lr},               {"grad_norm", grad_norm},
                      {"tokens_per_s", tps}};
  if (gpu_peak_gib >= 0) j["gpu_mem_peak_gib"] = gpu_peak_gib;
  jsonl_ << j.dump() << "\n" << std::flush;
  csv_ << "train," << step << "," << epoch << "," << loss << "," << lr << "," << grad_norm << "," << tps
       << "\n" << std::flush;
  train_loss_.emplace_back(step, loss);
  lr_.emplace_back(step, lr);
}

void MetricsLog::eval(int64_t step, double loss) {
  nlohmann::json j = {{"kind", "eval"}, {"step", step}, {"loss", loss}};
  jsonl_ << j.dump() << "\n" << std::flush;
  csv_ << "eval," << step << ",," << loss << ",,,\n" << std::flush;
  eval_loss_.emplace_back(step, loss);
  write_svg();
}

namespace {

// One panel: series scaled into a box, with min/max labels.
void panel(std::ostringstream& svg, double y0, const char* title,
           const std::vector<std::pair<const std::vector<std::pair<int64_t, double>>*, const char*>>& series,
           int64_t max_step) {
  const double x0 = 60, w = 560, h = 150;
  double lo = INFINITY, hi = -INFINITY;
  for (auto& [s, color] : series)
    for (auto& [step, v] : *s)
      if (std::isfinite(v)) lo = std::min(lo, v), hi = std::max(hi, v);
  if (!std::isfinite(lo)) lo = 0, hi = 1;
  if (hi - lo < 1e-12) hi = lo + 1;
  svg << "<text x='" << x0 << "' y='" << y0 - 6 << "' font-size='13'>" << title << "</text>\n";
  svg << "<rect x='" << x0 << "' y='" << y0 << "' width='" << w << "' height='" << h
      << "' fill='none' stroke='#999'/>\n";
  svg << "<text x='4' y='" << y0 + 12 << "' font-size='10'>" << hi << "</text>\n";
  svg << "<text x='4' y='" << y0 + h << "' font-size='10'>" << lo << "</text>\n";
  for (auto& [s, color] : series) {
    if (s->empty()) continue;
    svg << "<polyline fill='none' stroke='" << color << "' stroke-width='1.5' points='";
    for (auto& [step, v] : *s) {
      const double x = x0 + w * static_cast<double>(step) / static_cast<double>(std::max<int64_t>(1, max_step));
      const double y = y0 + h * (1.0 - (v - lo) / (hi - lo));
      svg << x << "," << y << " ";
    }
    svg << "'/>\n";
  }
}

}  // namespace

void MetricsLog::write_svg() const {
  int64_t max_step = 1;
  for (auto* s : {&train_loss_, &eval_loss_}) if (!s->empty()) max_step = std::max(max_step, s->back().first);
  std::ostringstream svg;
  svg << "<svg xmlns='http://www.w3.org/2000/svg' width='640' height='420' font-family='sans-serif'>\n"
      << "<rect width='100%' height='100%' fill='white'/>\n";
  panel(svg, 30, "loss (blue: train, red: eval) vs step", {{&train_loss_, "#1f77b4"}, {&eval_loss_, "#d62728"}},
        max_step);
  panel(svg, 240, "learning rate vs step", {{&lr_, "#2ca02c"}}, max_step);
  svg << "<text x='560' y='410' font-size='11'>step " << max_step << "</text>\n</svg>\n";
  io::write_file_atomic((dir_ / "loss.svg").string(), svg.str());
}

}  // namespace peftfw::train
