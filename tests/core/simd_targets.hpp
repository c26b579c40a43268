// The SIMD targets a core test can run here, and a guard that leaves Highway's dispatcher as
// it found it (dispatch_test and nan_test run every kernel on every target).
#pragma once

#include <hwy/targets.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace softce_test {

// Targets this binary can run here, best first (Highway orders its target bits so that a
// lower bit is a better target).
inline std::vector<std::int64_t> runnable_targets() {
  std::vector<std::int64_t> targets = hwy::SupportedAndGeneratedTargets();
  std::sort(targets.begin(), targets.end());
  return targets;
}

// Leaves the dispatcher as it found it, whatever a test does.
struct restore_targets {
  ~restore_targets() { hwy::SetSupportedTargetsForTest(0); }
};

}  // namespace softce_test
