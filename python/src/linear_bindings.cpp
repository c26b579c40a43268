// Python bindings: linear (placeholder, filled in next).
#include <nanobind/nanobind.h>

namespace nb = nanobind;

void bind_linear(nb::module_& m) { (void)m; }
