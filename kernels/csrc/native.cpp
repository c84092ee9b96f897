// CPU kernels behind fss.kernels (impl="native"): plain C++ over float buffers, OpenMP, no libtorch.
// Python passes C-contiguous numpy views of torch tensors (outputs preallocated by the caller).
#include <pybind11/pybind11.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <pybind11/numpy.h>

#include "bilinear.h"
#include "ops.h"

namespace py = pybind11;

static int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// (i0, i1, w0, w1) of fss::bilinear_taps, for tests against torch's own weights.
static py::tuple bilinear_taps(int64_t out_size, int64_t in_size) {
  const fss::Taps t = fss::bilinear_taps(out_size, in_size);
  const auto copy = [](const auto& v) { return py::array(static_cast<py::ssize_t>(v.size()), v.data()); };
  return py::make_tuple(copy(t.i0), copy(t.i1), copy(t.w0), copy(t.w1));
}

PYBIND11_MODULE(_native, m) {
  m.doc() = "fss CPU kernels (C++, OpenMP)";
  m.def("max_threads", &max_threads, "OpenMP threads the kernels may use");
  m.def("bilinear_taps", &bilinear_taps, py::arg("out_size"), py::arg("in_size"),
        "Per output index: the two input indices and weights of torch's bilinear (align_corners=False).");
  m.def("prototypes", &fss::prototypes_forward, py::arg("feats"), py::arg("fg"), py::arg("bg"),
        py::arg("shot_valid"), py::arg("protos"), py::arg("pooled"), py::arg("counts"), py::arg("num_threads"),
        "feats B x N x K x C x h x w f32, fg / bg B x N x K x H x W (f32 or u8), shot_valid B x N x K u8 -> "
        "writes protos B x (1+N) x C, pooled B x N x K x 2 x h x w (adjoint-pooled fg / bg masks), "
        "counts B x N x K x 2 (mask sums).");
  m.def("segment", &fss::segment_forward, py::arg("qry"), py::arg("protos"), py::arg("scale"),
        py::arg("labels"), py::arg("prob"), py::arg("num_threads"),
        "qry B x Q x C x h x w f32, protos B x P x C f32 -> writes labels B x Q x H x W u8 and, unless prob is "
        "None, the max softmax probability B x Q x H x W f32.");
  m.def("match", &fss::match_forward, py::arg("qry"), py::arg("protos"), py::arg("scale"), py::arg("logits"),
        py::arg("num_threads"),
        "qry B x Q x C x h x w f32, protos B x P x C f32 -> writes logits B x Q x P x H x W f32.");
}
