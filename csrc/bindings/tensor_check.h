// Reading and checking torch tensors in the binding layer without linking libtorch: one
// `__dlpack__()` call gives a tensor's pointer, dtype, shape, strides and device (DLPack's stable
// ABI), and every mismatch raises a Python exception naming the argument and the fix.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "pregated/types.h"

namespace pregated::bindings {

namespace py = pybind11;

struct tensor_info {
  py::object tensor;
  uintptr_t data = 0;
  std::string dtype;         // "float32", "bfloat16", "int64", ...
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // in elements, one per dimension
  std::string device_type;   // "cpu", "cuda", ...
  int device_index = -1;
  bool contiguous = false;

  std::string device() const;  // "cpu", "cuda:0"
  std::string shape_str() const;
};

// Raises TypeError when `obj` is not a torch.Tensor.
tensor_info inspect(py::handle obj, const char* name);

// Each raises ValueError with a message that names `name`, what was expected and what to do.
void expect_dims(const tensor_info& t, const char* name, std::vector<int64_t> dims,
                 const char* layout);  // dims: -1 = any size
void expect_dtype(const tensor_info& t, const char* name, const std::string& dtype);
void expect_device(const tensor_info& t, const char* name, const std::string& device);
void expect_contiguous(const tensor_info& t, const char* name);
// On the host, contiguous and of `dtype`.
void expect_host_contiguous(const tensor_info& t, const char* name, const std::string& dtype);
// On the host, of `dtype`, its last two dimensions compact (rows of contiguous elements one after
// another); the others may have any stride (a view of a larger buffer).
void expect_host_rows(const tensor_info& t, const char* name, const std::string& dtype);

// Copy to a contiguous host tensor of the given torch dtype name ("int32", "float32").
tensor_info to_host(const tensor_info& t, const char* name, const char* dtype);

// The values of a (small) tensor as int32 expert ids / float32 weights: read in place when it is
// a contiguous host tensor (no torch call), through a host copy otherwise. Refuse other dtypes.
std::vector<int32_t> host_ids(const tensor_info& t, const char* name);
std::vector<float> host_floats(const tensor_info& t, const char* name);

}  // namespace pregated::bindings
