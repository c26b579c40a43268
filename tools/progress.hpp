// softce CLI — training progress on stderr: a bar with ETA redrawn in place on a terminal,
// one plain line per epoch otherwise (logs, pipes, CI).
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

namespace softce::cli {

class progress {
 public:
  // mode: "auto" (bar when stderr is a terminal), "bar", "lines", "none"
  progress(const std::string& label, int epochs, const std::string& mode = "auto");
  void batch(int epoch, std::int64_t done, std::int64_t total, double loss);
  // Ends the epoch's bar with a summary line (`extra` e.g. "val_accuracy 0.87").
  void epoch(int epoch, double loss, const std::string& extra);
  void finish();

 private:
  std::string eta(double fraction) const;
  std::string label_;
  int epochs_;
  bool bar_ = false, enabled_ = true, drawn_ = false;
  std::chrono::steady_clock::time_point start_, last_draw_;
};

std::string format_duration(double seconds);  // "1:05", "12:00", "1:02:03"

}  // namespace softce::cli
