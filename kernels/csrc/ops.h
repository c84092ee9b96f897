// Entry points of the _native module (see native.cpp for the Python-facing docs).
#pragma once

#include <pybind11/numpy.h>

namespace fss {

namespace py = pybind11;

void prototypes_forward(py::array feats, py::array fg, py::array bg, py::array shot_valid, py::array protos,
                        py::array pooled, py::array counts, int num_threads);

void segment_forward(py::array qry, py::array protos, float scale, py::array labels, py::object prob,
                     int num_threads);

void match_forward(py::array qry, py::array protos, float scale, py::array logits, int num_threads);

}  // namespace fss
