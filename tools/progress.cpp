// softce CLI — progress display (see progress.hpp).
#include "progress.hpp"

#include <unistd.h>

#include <algorithm>
#include <cmath>

namespace softce::cli {

std::string format_duration(double seconds) {
  long s = std::lround(std::max(0.0, seconds));
  char buffer[32];
  if (s >= 3600)
    std::snprintf(buffer, sizeof buffer, "%ld:%02ld:%02ld", s / 3600, s / 60 % 60, s % 60);
  else
    std::snprintf(buffer, sizeof buffer, "%ld:%02ld", s / 60, s % 60);
  return buffer;
}

progress::progress(const std::string& label, int epochs, const std::string& mode)
    : label_(label), epochs_(epochs) {
  bar_ = mode == "bar" || (mode == "auto" && ::isatty(STDERR_FILENO));
  enabled_ = mode != "none";
  start_ = last_draw_ = std::chrono::steady_clock::now();
}

std::string progress::eta(double fraction) const {
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  if (fraction <= 0) return "--:--";
  return format_duration(elapsed / fraction - elapsed);
}

void progress::batch(int epoch, std::int64_t done, std::int64_t total, double loss) {
  if (!enabled_ || !bar_) return;
  const auto now = std::chrono::steady_clock::now();
  if (done != total && now - last_draw_ < std::chrono::milliseconds(100)) return;
  last_draw_ = now;
  const double in_epoch = static_cast<double>(done) / static_cast<double>(total);
  const double overall = (epoch - 1 + in_epoch) / epochs_;
  constexpr int width = 24;
  const int filled = static_cast<int>(in_epoch * width);
  std::string bar(filled, '=');
  if (filled < width) bar += '>', bar.append(width - filled - 1, ' ');
  std::fprintf(stderr, "\r\x1b[K%s epoch %d/%d [%s] %3d%%  loss %.4f  ETA %s", label_.c_str(),
               epoch, epochs_, bar.c_str(), static_cast<int>(in_epoch * 100), loss,
               eta(overall).c_str());
  std::fflush(stderr);
  drawn_ = true;
}

void progress::epoch(int epoch, double loss, const std::string& extra) {
  if (!enabled_) return;
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  std::fprintf(stderr, "%s%s epoch %d/%d  loss %.4f%s%s  %.1fs  ETA %s\n",
               bar_ && drawn_ ? "\r\x1b[K" : "", label_.c_str(), epoch, epochs_, loss,
               extra.empty() ? "" : "  ", extra.c_str(), elapsed,
               eta(static_cast<double>(epoch) / epochs_).c_str());
  std::fflush(stderr);
  drawn_ = false;
}

void progress::finish() {
  if (enabled_ && bar_ && drawn_) std::fprintf(stderr, "\r\x1b[K"), std::fflush(stderr);
  drawn_ = false;
}

}  // namespace softce::cli
