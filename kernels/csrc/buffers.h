// Checked views of numpy arrays (torch tensors arrive through Tensor.numpy(), zero-copy).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <initializer_list>
#include <stdexcept>
#include <string>

namespace fss {

namespace py = pybind11;

inline std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) s += (d ? ", " : "") + std::to_string(a.shape(d));
  return s + ")";
}

// The array's data as T*, after checking dtype, C-contiguity and (where given, >= 0) each dimension.
// Writing through a strided or converted copy would silently lose the result, hence no conversion.
template <typename T>
T* checked_data(py::array& a, const char* name, std::initializer_list<py::ssize_t> shape) {
  if (!a.dtype().is(py::dtype::of<T>())) throw std::invalid_argument(std::string(name) + ": wrong dtype");
  if (!(a.flags() & py::array::c_style)) throw std::invalid_argument(std::string(name) + ": not C-contiguous");
  bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
  py::ssize_t d = 0;
  for (auto it = shape.begin(); ok && it != shape.end(); ++it, ++d) ok = *it < 0 || a.shape(d) == *it;
  if (!ok) throw std::invalid_argument(std::string(name) + ": unexpected shape " + shape_str(a));
  return static_cast<T*>(a.mutable_data());
}

}  // namespace fss
