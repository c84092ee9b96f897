// CPU kernels behind fss.kernels (impl="native"). Filled by the fused-kernel work (issue #3).
#include <pybind11/pybind11.h>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

static int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

PYBIND11_MODULE(_native, m) {
  m.doc() = "fss CPU kernels (C++, OpenMP)";
  m.def("max_threads", &max_threads, "OpenMP threads the kernels may use");
}
