// metrics.jsonl, metrics.csv and loss.svg of a run.
#include "peftfw/train/metrics.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <cmath>
#include <nlohmann/json.hpp>
#include <sstream>

#include "peftfw/error.hpp"
#include "peftfw/io/safetensors.hpp"

namespace fs = std::filesystem;

namespace peftfw::train {

namespace {

const char* kCsvHeader = "kind,step,epoch,loss,lr,grad_norm,tokens_per_s\n";

std::string csv_row(const nlohmann::json& row) {
  auto field = [&](const char* key) -> std::string {
    if (!row.contains(key) || row[key].is_null()) return "";
    std::ostringstream os;
    if (row[key].is_number_integer()) os << row[key].get<int64_t>();
    else os << row[key].get<double>();
    return os.str();
  };
  return row.value("kind", "") + "," + field("step") + "," + field("epoch") + "," + field("loss") + "," +
         field("lr") + "," + field("grad_norm") + "," + field("tokens_per_s") + "\n";
}

int open_append(const fs::path& file) {
  const int fd = ::open(file.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) throw RuntimeError(file.string() + ": cannot open for writing: " + std::strerror(errno));
  return fd;
}

void append(int fd, const fs::path& file, const std::string& text) {
  const char* p = text.data();
  size_t n = text.size();
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) throw RuntimeError(file.string() + ": write failed: " + std::strerror(errno));
    p += w;
    n -= static_cast<size_t>(w);
  }
}

}  // namespace

MetricsLog::MetricsLog(const fs::path& run_dir, int64_t resume_step) : dir_(run_dir) {
  std::string jsonl, csv = kCsvHeader;
  if (resume_step >= 0) {
    // Keep the rows up to the checkpoint's step; the steps after it run again.
    std::ifstream in(run_dir / "metrics.jsonl");
    std::string line;
    while (std::getline(in, line)) {
      if (in.eof()) break;  // no newline: a line torn by a kill
      auto row = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (row.is_discarded() || !row.is_object() || !row.contains("step") || !row["step"].is_number_integer())
        continue;
      if (row["step"].get<int64_t>() > resume_step) continue;
      jsonl += row.dump() + "\n";
      csv += csv_row(row);
      remember(row);
    }
  }
  io::write_file_atomic((run_dir / "metrics.jsonl").string(), jsonl);
  io::write_file_atomic((run_dir / "metrics.csv").string(), csv);
  jsonl_fd_ = open_append(run_dir / "metrics.jsonl");
  csv_fd_ = open_append(run_dir / "metrics.csv");
}

MetricsLog::~MetricsLog() {
  if (jsonl_fd_ >= 0) ::close(jsonl_fd_);
  if (csv_fd_ >= 0) ::close(csv_fd_);
}

void MetricsLog::record(const nlohmann::json& row) {
  append(jsonl_fd_, dir_ / "metrics.jsonl", row.dump() + "\n");
  append(csv_fd_, dir_ / "metrics.csv", csv_row(row));
  remember(row);
}

void MetricsLog::remember(const nlohmann::json& row) {
  const auto step = row["step"].get<int64_t>();
  const auto number = [&](const char* key) {
    return row.contains(key) && row[key].is_number() ? row[key].get<double>() : std::nan("");
  };
  if (row.value("kind", "") == "eval") {
    eval_loss_.emplace_back(step, number("loss"));
  } else {
    train_loss_.emplace_back(step, number("loss"));
    lr_.emplace_back(step, number("lr"));
  }
}

void MetricsLog::step(int64_t step, int64_t epoch, double loss, double lr, double grad_norm, double tps,
                      double gpu_peak_gib) {
  nlohmann::json j = {{"kind", "train"}, {"step", step},           {"epoch", epoch},
                      {"loss", loss},    {"lr", lr},               {"grad_norm", grad_norm},
                      {"tokens_per_s", tps}};
  if (gpu_peak_gib >= 0) j["gpu_mem_peak_gib"] = gpu_peak_gib;
  record(j);
}

void MetricsLog::eval(int64_t step, double loss) {
  record({{"kind", "eval"}, {"step", step}, {"loss", loss}});
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
