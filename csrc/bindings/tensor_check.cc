#include "tensor_check.h"

#include <pybind11/stl.h>

#include <cmath>
#include <cstring>

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

namespace {

// The DLPack ABI (stable since v0.6): what `Tensor.__dlpack__()` hands over in a capsule, so one
// call reads a tensor's pointer, device, dtype, shape and strides.
struct dl_device { int32_t device_type; int32_t device_id; };  // 1 CPU, 2 CUDA, 3 CUDA host
struct dl_dtype { uint8_t code; uint8_t bits; uint16_t lanes; };  // 0 int, 1 uint, 2 float, 4 bfloat, 6 bool
struct dl_tensor {
  void* data;
  dl_device device;
  int32_t ndim;
  dl_dtype dtype;
  int64_t* shape;
  int64_t* strides;  // null: compact row-major
  uint64_t byte_offset;
};
struct dl_managed_tensor {
  dl_tensor tensor;
  void* manager_ctx;
  void (*deleter)(dl_managed_tensor*);
};

std::string dtype_of(const dl_dtype& d) {
  const std::string bits = std::to_string(d.bits);
  switch (d.code) {
    case 0: return "int" + bits;
    case 1: return d.bits == 8 ? "uint8" : "uint" + bits;
    case 2: return d.bits == 16 ? "float16" : "float" + bits;
    case 4: return "bfloat16";
    case 6: return "bool";
    default: return "code" + std::to_string(d.code) + "x" + bits;
  }
}

const py::object& tensor_type() {
  static py::object* type = new py::object(py::module_::import("torch").attr("Tensor"));  // never freed
  return *type;
}

// torch.utils.dlpack.to_dlpack: the C function itself (Tensor.__dlpack__ wraps it in Python checks
// that cost ten times more per call).
const py::object& to_dlpack() {
  static py::object* fn = new py::object(py::module_::import("torch.utils.dlpack").attr("to_dlpack"));
  return *fn;
}

// Every attribute read through Python: for what DLPack does not export (meta tensors,
// conjugated views), so that the checks below can name the problem.
tensor_info inspect_attributes(py::handle obj) {
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
  for (py::handle st : obj.attr("stride")()) t.strides.push_back(st.cast<int64_t>());
  return t;
}

}  // namespace

tensor_info inspect(py::handle obj, const char* name) {
  if (!py::isinstance(obj, tensor_type())) {
    throw py::type_error(std::string(name) + " must be a torch.Tensor, got " +
                         py::str(py::type::of(obj).attr("__name__")).cast<std::string>());
  }
  py::capsule cap;
  try {
    cap = to_dlpack()(obj);
  } catch (py::error_already_set&) {
    return inspect_attributes(obj);
  }
  auto* managed = static_cast<dl_managed_tensor*>(PyCapsule_GetPointer(cap.ptr(), "dltensor"));
  if (managed == nullptr) throw py::error_already_set();
  tensor_info t;
  t.tensor = py::reinterpret_borrow<py::object>(obj);
  const dl_tensor& d = managed->tensor;
  t.data = reinterpret_cast<uintptr_t>(d.data) + d.byte_offset;
  t.dtype = dtype_of(d.dtype);
  t.shape.assign(d.shape, d.shape + d.ndim);
  t.device_type = d.device.device_type == 2 ? "cuda" : d.device.device_type == 1 || d.device.device_type == 3 ? "cpu" : "other";
  t.device_index = d.device.device_type == 2 ? d.device.device_id : -1;
  t.contiguous = true;
  t.strides.assign(static_cast<size_t>(d.ndim), 0);
  int64_t compact = 1;
  for (int32_t i = d.ndim - 1; i >= 0; --i) {
    t.strides[static_cast<size_t>(i)] = d.strides != nullptr ? d.strides[i] : compact;
    if (d.shape[i] != 1 && t.strides[static_cast<size_t>(i)] != compact) t.contiguous = false;
    compact *= d.shape[i];
  }
  // The tensor stays alive (t.tensor): the capsule's extra reference can go now.
  PyCapsule_SetName(cap.ptr(), "used_dltensor");
  if (managed->deleter != nullptr) managed->deleter(managed);
  if (t.device_type == "other") return inspect_attributes(obj);
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

void expect_host_contiguous(const tensor_info& t, const char* name, const std::string& dtype) {
  expect_device(t, name, "cpu");
  expect_dtype(t, name, dtype);
  expect_contiguous(t, name);
}

void expect_host_rows(const tensor_info& t, const char* name, const std::string& dtype) {
  expect_device(t, name, "cpu");
  expect_dtype(t, name, dtype);
  const size_t n = t.shape.size();
  const bool rows = n < 2 || ((t.shape[n - 1] == 1 || t.strides[n - 1] == 1) &&
                              (t.shape[n - 2] == 1 || t.strides[n - 2] == t.shape[n - 1]));
  if (!rows) {
    throw py::value_error(std::string(name) + " (shape " + t.shape_str() +
                          ") must have its last two dimensions contiguous; call .contiguous() on it first");
  }
}

tensor_info to_host(const tensor_info& t, const char* name, const char* dtype) {
  py::module_ torch = py::module_::import("torch");
  py::object host = t.tensor.attr("to")("cpu", torch.attr(dtype)).attr("contiguous")();
  return inspect(host, name);
}

template <typename T>
std::vector<T> read_host(const tensor_info& t, const char* name, bool integers) {
  const int64_t n = t.shape.empty() ? 1 : [&] { int64_t k = 1; for (int64_t d : t.shape) k *= d; return k; }();
  std::vector<T> out(static_cast<size_t>(n));
  const auto* p = reinterpret_cast<const uint8_t*>(t.data);
  auto each = [&](auto tag) {
    using S = decltype(tag);
    const S* src = reinterpret_cast<const S*>(p);
    for (int64_t i = 0; i < n; ++i) out[static_cast<size_t>(i)] = static_cast<T>(src[i]);
  };
  if (integers) {
    if (t.dtype == "int64") each(int64_t{});
    else if (t.dtype == "int32") each(int32_t{});
    else if (t.dtype == "int16") each(int16_t{});
    else if (t.dtype == "uint8") each(uint8_t{});
    else throw py::value_error(std::string(name) + " must be an integer tensor of expert ids, got torch." + t.dtype);
  } else if (t.dtype == "float32") {
    each(float{});
  } else if (t.dtype == "float64") {
    each(double{});
  } else if (t.dtype == "bfloat16" || t.dtype == "float16") {
    const uint16_t* src = reinterpret_cast<const uint16_t*>(p);
    for (int64_t i = 0; i < n; ++i) {
      uint32_t bits;
      if (t.dtype == "bfloat16") {
        bits = static_cast<uint32_t>(src[i]) << 16;
      } else {  // float16 -> float32
        const uint32_t h = src[i], sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
        if (exp == 0) {
          float v = std::ldexp(static_cast<float>(man), -24);
          std::memcpy(&bits, &v, 4);
          bits |= sign;
        } else if (exp == 31) {
          bits = sign | 0x7f800000u | (man << 13);
        } else {
          bits = sign | ((exp + 112) << 23) | (man << 13);
        }
      }
      float v;
      std::memcpy(&v, &bits, 4);
      out[static_cast<size_t>(i)] = static_cast<T>(v);
    }
  } else {
    throw py::value_error(std::string(name) + " must be a floating-point tensor, got torch." + t.dtype);
  }
  return out;
}

std::vector<int32_t> host_ids(const tensor_info& t, const char* name) {
  if (t.device_type != "cpu" || !t.contiguous) return read_host<int32_t>(to_host(t, name, "int64"), name, true);
  return read_host<int32_t>(t, name, true);
}

std::vector<float> host_floats(const tensor_info& t, const char* name) {
  if (t.device_type != "cpu" || !t.contiguous) return read_host<float>(to_host(t, name, "float32"), name, false);
  return read_host<float>(t, name, false);
}

}  // namespace pregated::bindings
