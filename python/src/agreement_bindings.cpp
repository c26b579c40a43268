// Python bindings: agreement (placeholder, filled in next).
#include <nanobind/nanobind.h>

namespace nb = nanobind;

void bind_agreement(nb::module_& m) { (void)m; }
