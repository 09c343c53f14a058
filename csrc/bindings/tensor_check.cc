#include "tensor_check.h"

#include <pybind11/stl.h>

namespace pregated::bindings {

std::string tensor_info::device() const {
  if (device_index < 0) return device_type;
  return device_type + ":" + std::to_string(device_index);
}

std::string tensor_info::shape_str() const {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

tensor_info inspect(py::handle obj, const char* name) {
  py::module_ torch = py::module_::import("torch");
  if (!py::isinstance(obj, torch.attr("Tensor"))) {
    throw py::type_error(std::string(name) + " must be a torch.Tensor, got " +
                         py::str(py::type::of(obj).attr("__name__")).cast<std::string>());
  }
  tensor_info t;
  t.tensor = py::reinterpret_borrow<py::object>(obj);
  t.data = obj.attr("data_ptr")().cast<uintptr_t>();
  std::string dt = py::str(obj.attr("dtype")).cast<std::string>();
  t.dtype = dt.rfind("torch.", 0) == 0 ? dt.substr(6) : dt;
  for (py::handle d : obj.attr("shape")) t.shape.push_back(d.cast<int64_t>());
  py::object dev = obj.attr("device");
  t.device_type = dev.attr("type").cast<std::string>();
  py::object idx = dev.attr("index");
  t.device_index = idx.is_none() ? -1 : idx.cast<int>();
  if (t.device_type == "cuda" && t.device_index < 0) t.device_index = 0;
  t.contiguous = obj.attr("is_contiguous")().cast<bool>();
  return t;
}

void expect_dims(const tensor_info& t, const char* name, std::vector<int64_t> dims,
                 const char* layout) {
  bool ok = t.shape.size() == dims.size();
  for (size_t i = 0; ok && i < dims.size(); ++i) ok = dims[i] < 0 || dims[i] == t.shape[i];
  if (ok) return;
  std::string want = "[";
  for (size_t i = 0; i < dims.size(); ++i) {
    want += (i ? ", " : "") + (dims[i] < 0 ? std::string("*") : std::to_string(dims[i]));
  }
  throw py::value_error(std::string(name) + " must have shape " + want + "] (" + layout +
                        "), got " + t.shape_str());
}

void expect_dtype(const tensor_info& t, const char* name, const std::string& dtype) {
  if (t.dtype == dtype) return;
  throw py::value_error(std::string(name) + " must be torch." + dtype + ", got torch." +
                        t.dtype + "; convert it with .to(torch." + dtype + ")");
}

void expect_device(const tensor_info& t, const char* name, const std::string& device) {
  if (t.device() == device) return;
  throw py::value_error(std::string(name) + " is on " + t.device() + " but the runtime runs on " +
                        device + "; move it with .to('" + device + "')");
}

void expect_contiguous(const tensor_info& t, const char* name) {
  if (t.contiguous) return;
  throw py::value_error(std::string(name) +
                        " must be contiguous; call .contiguous() on it first");
}

tensor_info to_host(const tensor_info& t, const char* name, const char* dtype) {
  py::module_ torch = py::module_::import("torch");
  py::object host = t.tensor.attr("to")("cpu", torch.attr(dtype)).attr("contiguous")();
  return inspect(host, name);
}


}  // namespace pregated::bindings
