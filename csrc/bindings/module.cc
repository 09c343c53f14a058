// pregated._core: the runtime for Python. Tensors are checked here (device, dtype, shape,
// contiguity) and handed to the core as raw pointers plus PyTorch's current stream.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "pregated/pregated.h"
#include "tensor_check.h"

namespace py = pybind11;
using namespace pregated;
using bindings::expect_contiguous;
using bindings::expect_device;
using bindings::expect_dims;
using bindings::expect_dtype;
using bindings::inspect;
using bindings::tensor_info;

namespace {

// Turns a non-ok status into the matching Python exception.
void throw_if_error(const status& st) {
  if (st.is_ok()) return;
  switch (st.code()) {
    case status_code::status_code_invalid_argument: throw py::value_error(st.message());
    case status_code::status_code_out_of_memory:
      PyErr_SetString(PyExc_MemoryError, st.message().c_str());
      throw py::error_already_set();
    default: throw std::runtime_error(st.message());
  }
}

int64_t bytes_arg(const py::object& v, const char* name) {
  if (v.is_none()) return -1;
  if (py::isinstance<py::str>(v)) {
    int64_t out = 0;
    throw_if_error(parse_bytes(v.cast<std::string>(), &out));
    return out;
  }
  if (py::isinstance<py::int_>(v)) {
    const int64_t out = v.cast<int64_t>();
    if (out < 0) throw py::value_error(std::string(name) + " must not be negative");
    return out;
  }
  throw py::type_error(std::string(name) + " must be None, a byte count or a string like '8GiB'");
}

std::vector<int32_t> id_list(const py::object& v, const char* name) {
  std::vector<int32_t> out;
  if (v.is_none()) return out;
  py::module_ torch = py::module_::import("torch");
  if (py::isinstance(v, torch.attr("Tensor"))) return bindings::host_ids(inspect(v, name), name);
  for (py::handle e : v) out.push_back(e.cast<int32_t>());
  return out;
}

py::dict layer_dict(const layer_stats& s) {
  py::dict d;
  d["bytes_h2d"] = s.bytes_h2d;
  d["expert_hits"] = s.expert_hits;
  d["expert_misses"] = s.expert_misses;
  d["prefetch_issued"] = s.prefetch_issued;
  d["prefetch_used"] = s.prefetch_used;
  d["prefetch_dropped"] = s.prefetch_dropped;
  d["stall_seconds"] = s.stall_seconds;
  d["host_experts"] = s.host_experts;
  d["host_bytes"] = s.host_bytes;
  d["host_seconds"] = s.host_seconds;
  d["host_wait_seconds"] = s.host_wait_seconds;
  d["device_seconds"] = s.device_seconds;
  d["store_reads"] = s.store_reads;
  d["store_read_bytes"] = s.store_read_bytes;
  d["predicted_experts"] = s.predicted_experts;
  d["predicted_routed"] = s.predicted_routed;
  d["routed_after_prediction"] = s.routed_after_prediction;
  return d;
}

class py_runtime {
 public:
  py_runtime(int32_t num_layers, int32_t num_experts, int64_t hidden, int64_t intermediate,
             const std::string& ffn, const std::string& dtype_name, const std::string& device,
             const py::object& expert_memory, const std::string& eviction, int32_t copy_depth,
             bool has_bias, float alpha, float limit, const std::string& expert_format, int64_t group_size) {
    runtime_config cfg;
    cfg.num_layers = num_layers;
    cfg.num_experts = num_experts;
    cfg.spec.hidden = hidden;
    cfg.spec.intermediate = intermediate;
    cfg.spec.has_bias = has_bias;
    cfg.spec.alpha = alpha;
    cfg.spec.limit = limit;
    throw_if_error(parse_weight_format(expert_format, &cfg.spec.format));
    cfg.spec.group_size = group_size;
    throw_if_error(parse_ffn_kind(ffn, &cfg.spec.kind));
    throw_if_error(parse_dtype(dtype_name, &cfg.spec.dt));
    throw_if_error(parse_eviction_policy(eviction, &cfg.eviction));
    cfg.expert_memory = bytes_arg(expert_memory, "expert_memory");
    cfg.copy_depth = copy_depth;

    std::unique_ptr<backend> be;
    if (device == "cpu") {
      // PREGATED_CPU_COPY_DELAY_US: asynchronous copies after that delay (tests of the waiting paths)
      cpu_backend_options opts;
      if (const char* delay = std::getenv("PREGATED_CPU_COPY_DELAY_US")) opts.copy_delay_us = std::atoll(delay);
      be = make_cpu_backend(opts);
      device_ = "cpu";
    } else if (device.rfind("cuda", 0) == 0) {
      int index = 0;
      if (device.size() > 4) {
        if (device[4] != ':' || device.size() == 5) {
          throw py::value_error("device '" + device + "' is not understood: use 'cpu', 'cuda' or 'cuda:N'");
        }
        try {
          index = std::stoi(device.substr(5));
        } catch (const std::exception&) {
          throw py::value_error("device '" + device + "' is not understood: use 'cpu', 'cuda' or 'cuda:N'");
        }
      }
      throw_if_error(make_cuda_backend(index, &be));
      device_ = "cuda:" + std::to_string(index);
    } else {
      throw py::value_error("device '" + device + "' is not supported: use 'cpu' or 'cuda[:N]'");
    }
    std::unique_ptr<runtime> rt;
    {
      py::gil_scoped_release nogil;  // allocating a large pinned store takes a while
      throw_if_error(runtime::create(std::move(be), cfg, &rt));
    }
    rt_ = std::move(rt);
  }

  runtime& rt() {
    if (rt_->closed()) {
      throw std::runtime_error("the runtime was closed; create a new one to run MoE blocks again");
    }
    return *rt_;
  }

  void set_expert(int32_t layer, int32_t expert, const std::string& part, const py::object& obj) {
    runtime& r = rt();
    const expert_spec& sp = r.config().spec;
    int p = -1;
    for (int i = 0; i < sp.num_parts(); ++i) {
      if (part == sp.part_name(i)) p = i;
    }
    if (p < 0) {
      std::string names;
      for (int i = 0; i < sp.num_parts(); ++i) names += (i ? ", " : "") + std::string(sp.part_name(i));
      throw py::value_error("unknown part '" + part + "' for a " + ffn_kind_name(sp.kind) +
                            " expert: use one of " + names);
    }
    const std::string name = std::string("weight '") + part + "'";
    tensor_info t = inspect(obj, name.c_str());
    int64_t rows = 0, cols = 0;
    sp.part_shape(p, &rows, &cols);
    expect_device(t, name.c_str(), "cpu");
    expect_dtype(t, name.c_str(), sp.part_dtype(p));
    if (cols == 0) {
      expect_dims(t, name.c_str(), {rows}, p == sp.num_parts() - 1 ? "hidden" : "intermediate");
    } else if (p < sp.num_weights() && sp.quantized()) {
      expect_dims(t, name.c_str(), {rows, cols}, "rows, bytes of packed codes");
    } else if (p >= sp.num_weights()) {
      expect_dims(t, name.c_str(), {rows, cols}, "rows, groups");
    } else {
      expect_dims(t, name.c_str(), {rows, cols}, p == sp.down_part() ? "hidden, intermediate" : "intermediate, hidden");
    }
    expect_contiguous(t, name.c_str());
    const size_t bytes = sp.part_bytes(p);
    py::gil_scoped_release nogil;
    throw_if_error(r.store().set_part({layer, expert}, p, reinterpret_cast<const void*>(t.data), bytes));
  }

  // A block's input: [tokens, hidden] in the runtime's dtype, on its device, contiguous.
  tensor_info inspect_x(const py::object& x_obj, const expert_spec& sp) const {
    tensor_info x = inspect(x_obj, "x");
    expect_device(x, "x", device_);
    expect_dtype(x, "x", dtype_name(sp.dt));
    expect_dims(x, "x", {-1, sp.hidden}, "tokens, hidden");
    expect_contiguous(x, "x");
    return x;
  }

  py::bytes host_expert(int32_t layer, int32_t expert) {
    runtime& r = rt();
    throw_if_error(r.store().check_key({layer, expert}));
    return py::bytes(reinterpret_cast<const char*>(r.store().expert({layer, expert})),
                     r.store().expert_bytes());
  }

  py::object forward(int32_t layer, const py::object& x_obj, const py::object& ids_obj,
                     const py::object& w_obj, const py::object& out_obj, int32_t next_layer,
                     const py::object& next_experts) {
    runtime& r = rt();
    const expert_spec& sp = r.config().spec;
    tensor_info x = inspect_x(x_obj, sp);
    const int64_t T = x.shape[0];
    tensor_info ids = inspect(ids_obj, "ids");
    if (ids.dtype != "int32" && ids.dtype != "int64" && ids.dtype != "int16" && ids.dtype != "uint8") {
      throw py::value_error("ids must be an integer tensor of expert ids, got torch." + ids.dtype);
    }
    if (ids.shape.size() != 2 || ids.shape[0] != T) {
      throw py::value_error("ids must have shape [" + std::to_string(T) +
                            ", K] (tokens, experts per token) to match x, got " + ids.shape_str());
    }
    const int64_t K = ids.shape[1];
    tensor_info w = inspect(w_obj, "weights");
    if (w.dtype != "float32" && w.dtype != "float16" && w.dtype != "bfloat16" && w.dtype != "float64") {
      throw py::value_error("weights must be a floating-point tensor, got torch." + w.dtype);
    }
    expect_dims(w, "weights", {T, K}, "tokens, experts per token, like ids");
    py::object out = out_obj;
    if (out.is_none()) {
      out = x_obj.attr("new_empty")(x_obj.attr("shape"));
    }
    tensor_info o = inspect(out, "out");
    expect_device(o, "out", device_);
    expect_dtype(o, "out", dtype_name(sp.dt));
    expect_dims(o, "out", {T, sp.hidden}, "tokens, hidden");
    expect_contiguous(o, "out");
    const std::vector<int32_t> ids_h = bindings::host_ids(ids, "ids");
    const std::vector<float> w_h = bindings::host_floats(w, "weights");
    std::vector<int32_t> next = id_list(next_experts, "next_experts");

    moe_args a;
    a.layer = layer;
    a.tokens = T;
    a.top_k = K;
    a.x = reinterpret_cast<const void*>(x.data);
    a.out = reinterpret_cast<void*>(o.data);
    a.ids = ids_h.data();
    a.weights = w_h.data();
    a.stream = stream_handle();
    a.next_layer = next.empty() ? -1 : next_layer;
    a.next_experts = next.data();
    a.num_next = static_cast<int32_t>(next.size());
    {
      py::gil_scoped_release nogil;
      throw_if_error(r.moe_forward(a));
    }
    return out;
  }

  py::object forward_resident(int32_t layer, const py::object& x_obj, const py::object& ids_obj,
                              const py::object& w_obj, const py::object& out_obj) {
    resident_args a;
    py::object out = device_block(layer, x_obj, ids_obj, w_obj, out_obj, &a);
    runtime& r = rt();
    {
      py::gil_scoped_release nogil;
      throw_if_error(r.moe_forward_resident(a));
    }
    return out;
  }

  py::object forward_device(int32_t layer, const py::object& x_obj, const py::object& ids_obj,
                            const py::object& w_obj, const py::object& out_obj, int32_t next_layer,
                            const py::object& next_obj) {
    resident_args a;
    py::object out = device_block(layer, x_obj, ids_obj, w_obj, out_obj, &a);
    if (!next_obj.is_none()) {
      tensor_info n = inspect(next_obj, "next_ids");
      expect_device(n, "next_ids", device_);
      expect_dtype(n, "next_ids", "int32");
      expect_contiguous(n, "next_ids");
      a.next_layer = next_layer;
      a.next_ids = reinterpret_cast<const int32_t*>(n.data);
      a.num_next = 1;
      for (int64_t d : n.shape) a.num_next *= d;
    }
    runtime& r = rt();
    {
      py::gil_scoped_release nogil;
      throw_if_error(r.moe_forward_device(a));
    }
    return out;
  }

  // The arguments of a resident or device block, every tensor checked; returns `out` (made when
  // none is given).
  py::object device_block(int32_t layer, const py::object& x_obj, const py::object& ids_obj, const py::object& w_obj,
                          const py::object& out_obj, resident_args* args) {
    runtime& r = rt();
    const expert_spec& sp = r.config().spec;
    tensor_info x = inspect_x(x_obj, sp);
    const int64_t T = x.shape[0];
    tensor_info ids = inspect(ids_obj, "ids");
    expect_device(ids, "ids", device_);
    expect_dtype(ids, "ids", "int32");
    expect_dims(ids, "ids", {T, -1}, "tokens, experts per token");
    expect_contiguous(ids, "ids");
    const int64_t K = ids.shape[1];
    tensor_info w = inspect(w_obj, "weights");
    expect_device(w, "weights", device_);
    expect_dtype(w, "weights", "float32");
    expect_dims(w, "weights", {T, K}, "tokens, experts per token, like ids");
    expect_contiguous(w, "weights");
    py::object out = out_obj.is_none() ? x_obj.attr("new_empty")(x_obj.attr("shape")) : out_obj;
    tensor_info o = inspect(out, "out");
    expect_device(o, "out", device_);
    expect_dtype(o, "out", dtype_name(sp.dt));
    expect_dims(o, "out", {T, sp.hidden}, "tokens, hidden");
    expect_contiguous(o, "out");
    resident_args& a = *args;
    a.layer = layer;
    a.tokens = T;
    a.top_k = K;
    a.x = reinterpret_cast<const void*>(x.data);
    a.out = reinterpret_cast<void*>(o.data);
    a.ids = reinterpret_cast<const int32_t*>(ids.data);
    a.weights = reinterpret_cast<const float*>(w.data);
    a.stream = stream_handle();
    return out;
  }

  int64_t reserve_resident(int64_t rows) {
    int64_t bytes = 0;
    runtime& r = rt();
    {
      py::gil_scoped_release nogil;
      throw_if_error(r.reserve_resident(rows, &bytes));
    }
    return bytes;
  }

  std::vector<int32_t> slot_table() {
    std::vector<int32_t> out;
    throw_if_error(rt().slot_table(&out));
    return out;
  }

  void prefetch(int32_t layer, const py::object& experts) {
    runtime& r = rt();
    std::vector<int32_t> e = id_list(experts, "experts");
    py::gil_scoped_release nogil;
    throw_if_error(r.prefetch(layer, e.data(), static_cast<int32_t>(e.size())));
  }

  void set_host_lane(bool enabled, const std::string& plan, int32_t threads, int64_t hot_slots, double hot_decay,
                     double hot_min, int32_t rebalance_every, double link_bandwidth, double host_bandwidth,
                     double host_row_seconds) {
    host_lane_config hc;
    hc.enabled = enabled;
    if (plan == "auto") hc.plan = lane_plan::lane_plan_auto;
    else if (plan == "host") hc.plan = lane_plan::lane_plan_host;
    else if (plan == "copy") hc.plan = lane_plan::lane_plan_copy;
    else if (plan == "alternate") hc.plan = lane_plan::lane_plan_alternate;
    else throw py::value_error("host lane plan '" + plan + "' is not one of auto, host, copy, alternate");
    hc.threads = threads;
    hc.hot_slots = hot_slots;
    hc.hot_decay = hot_decay;
    hc.hot_min = hot_min;
    hc.rebalance_every = rebalance_every;
    hc.costs.link_bytes_per_s = link_bandwidth;
    hc.costs.host_bytes_per_s = host_bandwidth;
    hc.costs.host_row_s = host_row_seconds;
    runtime& r = rt();
    py::gil_scoped_release nogil;
    throw_if_error(r.set_host_lane(hc));
  }

  py::dict stats() {
    runtime_stats s;
    {
      py::gil_scoped_release nogil;
      s = rt_->stats();
    }
    py::dict d = layer_dict(s.total);
    d["evictions"] = s.evictions;
    d["forwards"] = s.forwards;
    d["resident_forwards"] = s.resident_forwards;
    d["device_forwards"] = s.device_forwards;
    d["resident_workspace_bytes"] = s.resident_workspace_bytes;
    d["hot_experts"] = s.hot_experts;
    py::dict costs;
    costs["link_bytes_per_s"] = s.costs.link_bytes_per_s;
    costs["host_bytes_per_s"] = s.costs.host_bytes_per_s;
    costs["host_row_s"] = s.costs.host_row_s;
    d["costs"] = costs;
    py::list layers;
    for (const layer_stats& l : s.layers) layers.append(layer_dict(l));
    d["layers"] = layers;
    return d;
  }

  py::list slots() {
    py::list out;
    for (const slot_snapshot& s : rt_->slots()) {
      py::dict d;
      d["slot"] = s.slot;
      d["layer"] = s.key.layer;
      d["expert"] = s.key.expert;
      d["state"] = slot_state_name(s.state);
      d["refs"] = s.refs;
      d["pinned"] = s.pinned;
      d["prefetched"] = s.prefetched;
      d["hot"] = s.hot;
      out.append(d);
    }
    return out;
  }

  py::list trace() {
    runtime& r = rt();
    std::vector<trace_event> events;
    {
      py::gil_scoped_release nogil;
      throw_if_error(r.trace(&events));
    }
    py::list out;
    for (const trace_event& e : events) {
      py::dict d;
      d["kind"] = e.kind == trace_event::kind_t::kind_copy ? "copy" : "compute";
      d["layer"] = e.layer;
      d["expert"] = e.expert;
      d["start_s"] = e.start_s;
      d["end_s"] = e.end_s;
      out.append(d);
    }
    return out;
  }

  void check() {
    runtime& r = rt();
    std::string report;
    py::gil_scoped_release nogil;
    throw_if_error(r.check(&report));
  }

  void close() {
    py::gil_scoped_release nogil;
    throw_if_error(rt_->close());
  }

  const std::string& device() const { return device_; }
  bool rt_closed() const { return rt_->closed(); }

 private:
  // PyTorch's current stream on our device: the runtime's GEMMs order with its kernels.
  void* stream_handle() {
    if (device_ == "cpu") return nullptr;
    py::module_ torch = py::module_::import("torch");
    py::object s = torch.attr("cuda").attr("current_stream")(rt_->get_backend().device_index());
    return reinterpret_cast<void*>(s.attr("cuda_stream").cast<uintptr_t>());
  }

  std::string device_;
  std::unique_ptr<runtime> rt_;
};

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "pregated C++ expert runtime (expert store, slot cache, prefetch queue, MoE forward)";

  m.def("build_info", [] {
    const build_info_t info = build_info();
    py::dict d;
    d["cuda"] = info.cuda;
    d["cuda_devices"] = cuda_device_count();
    d["blas"] = info.blas;
    d["version"] = info.version;
    d["cuda_archs"] = info.cuda_archs;
    return d;
  }, "What this build holds: cuda (compiled in), cuda_devices (usable now), blas, version.");

  m.def("parse_bytes", [](const std::string& s) {
    int64_t out = 0;
    throw_if_error(parse_bytes(s, &out));
    return out;
  }, py::arg("text"), "'8GiB', '512MB', '1.5G' or '123' -> bytes.");
  m.def("format_bytes", &format_bytes, py::arg("bytes"));
  m.attr("DEFAULT_GROUP_SIZE") = expert_spec{}.group_size;  // quantized experts' default group
  m.attr("RESIDENT_QUANTIZED_ROWS_MAX") = resident_quantized_rows_max;
  m.attr("DEVICE_ROWS_MAX") = device_rows_max;
  m.attr("DEVICE_NEXT_MAX") = device_next_max;
  m.def("cpu_kernel_isa", [] { return std::string(cpu_kernel_isa()); },
        "The instruction set of the CPU backend's decode kernels on this CPU: avx512, avx2 or portable.");
  m.def("cpu_threads", [] { return cpu_threads(); }, "Threads of the CPU backend's pool.");
  m.def("cpu_read_gbps", [](size_t nbytes) { py::gil_scoped_release nogil; return cpu_read_gbps(nbytes); },
        py::arg("nbytes"),
        "Host memory read bandwidth (GB/s): the best of five reads of an nbytes buffer on the CPU pool.");
  m.def("set_cpu_threads", [](int n) { py::gil_scoped_release nogil; set_cpu_threads(n); }, py::arg("threads"),
        "Threads of the CPU backend's pool (0: one per core, or PREGATED_NUM_THREADS); set while no MoE "
        "block runs on the CPU backend.");
  m.def("cpu_spin_us", [] { return cpu_spin_us(); },
        "Microseconds the CPU backend's pool spins for its next job before its threads sleep.");
  m.def("set_cpu_spin_us", [](int us) { set_cpu_spin_us(us); }, py::arg("us"),
        "Sets cpu_spin_us (0: sleep at once); a CPU decode loop raises it while it runs.");
  m.def("_force_cpu_kernel", [](const std::string& isa) { return cpu_kernel_force(isa); }, py::arg("isa"),
        "Tests: run the CPU backend's decode kernels on `isa`; False when this CPU cannot.");

  m.def("_quantized_gemm", [](const py::object& a_obj, const py::object& codes_obj, const py::object& scale_obj,
                              const py::object& zero_obj, int bits, int64_t group_size, const py::object& out_obj) {
    tensor_info a = inspect(a_obj, "a"), codes = inspect(codes_obj, "codes"), scale = inspect(scale_obj, "scale"),
                zero = inspect(zero_obj, "zero"), out = inspect(out_obj, "out");
    expect_dims(a, "a", {-1, -1}, "m, k");
    const int64_t m = a.shape[0], k = a.shape[1], n = codes.shape.empty() ? 0 : codes.shape[0];
    const int64_t groups = (k + group_size - 1) / group_size;
    expect_dims(codes, "codes", {n, -1}, "n, bytes of packed codes");
    expect_dims(scale, "scale", {n, groups}, "n, groups");
    expect_dims(zero, "zero", {n, groups}, "n, groups");
    expect_dims(out, "out", {m, n}, "m, n");
    if (a.dtype != "float32" && a.dtype != "bfloat16") {
      throw py::value_error("a must be float32 or bfloat16, got torch." + a.dtype);
    }
    const std::string adt = a.dtype;  // out in the same dtype
    for (const auto& [t, name, dt] : {std::tuple{&a, "a", adt.c_str()}, {&codes, "codes", "uint8"},
                                      {&scale, "scale", "float16"}, {&zero, "zero", "float16"},
                                      {&out, "out", adt.c_str()}}) {
      expect_device(*t, name, "cpu");
      expect_dtype(*t, name, dt);
      expect_contiguous(*t, name);
    }
    quantized_matrix q;
    q.bits = bits;
    q.group_size = group_size;
    q.codes = reinterpret_cast<const uint8_t*>(codes.data);
    q.row_bytes = codes.shape[1];
    q.scales = reinterpret_cast<const uint16_t*>(scale.data);
    q.zeros = reinterpret_cast<const uint16_t*>(zero.data);
    q.groups = groups;
    static const std::unique_ptr<backend> be = make_cpu_backend();
    const dtype dt = adt == "bfloat16" ? dtype::dtype_bf16 : dtype::dtype_f32;
    throw_if_error(be->gemm_nt_quantized(dt, m, n, k, reinterpret_cast<const void*>(a.data), k, q,
                                reinterpret_cast<void*>(out.data), n, nullptr));
  }, py::arg("a"), py::arg("codes"), py::arg("scale"), py::arg("zero"), py::arg("bits"), py::arg("group_size"),
        py::arg("out"), "Tests: out = a @ dequantize(codes, scale, zero).T on the CPU backend's kernels (a, out: float32 or bfloat16).");

  m.def("cpu_linear", [](const py::object& x_obj, const py::object& w_obj, const py::object& out_obj) {
    tensor_info x = inspect(x_obj, "x"), w = inspect(w_obj, "weight"), out = inspect(out_obj, "out");
    expect_dims(x, "x", {-1, -1}, "rows, in");
    const int64_t m = x.shape[0], k = x.shape[1];
    expect_dims(w, "weight", {-1, k}, "out, in");
    const int64_t n = w.shape[0];
    expect_dims(out, "out", {m, n}, "rows, out");
    expect_host_contiguous(x, "x", x.dtype);
    expect_host_contiguous(w, "weight", x.dtype);
    expect_host_contiguous(out, "out", x.dtype);
    dtype dt;
    throw_if_error(parse_dtype(x.dtype, &dt));
    static const std::unique_ptr<backend> be = make_cpu_backend();
    py::gil_scoped_release nogil;
    throw_if_error(be->gemm_nt(dt, m, n, k, reinterpret_cast<const void*>(x.data), k,
                               reinterpret_cast<const void*>(w.data), k, reinterpret_cast<void*>(out.data), n,
                               nullptr));
  }, py::arg("x"), py::arg("weight"), py::arg("out"),
        "out = x @ weight.T on the CPU backend's pool (float32, bfloat16 or float16; all three the same "
        "dtype, contiguous): up to 8 rows read the weight once with the few-row kernels.");

  m.def("cpu_rms_norm", [](const py::object& x_obj, const py::object& w_obj, double eps, const py::object& out_obj) {
    tensor_info x = inspect(x_obj, "x"), w = inspect(w_obj, "weight"), out = inspect(out_obj, "out");
    expect_dims(x, "x", {-1, -1}, "rows, hidden");
    expect_dims(w, "weight", {x.shape[1]}, "hidden");
    expect_dims(out, "out", {x.shape[0], x.shape[1]}, "rows, hidden");
    expect_host_contiguous(x, "x", x.dtype);
    expect_host_contiguous(w, "weight", x.dtype);
    expect_host_contiguous(out, "out", x.dtype);
    dtype dt;
    throw_if_error(parse_dtype(x.dtype, &dt));
    py::gil_scoped_release nogil;
    cpu_rms_norm(dt, x.shape[0], x.shape[1], reinterpret_cast<const void*>(x.data), reinterpret_cast<const void*>(w.data),
                 static_cast<float>(eps), reinterpret_cast<void*>(out.data));
  }, py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("out"),
        "out = transformers' RMSNorm of x's rows on the CPU (float32 inside; float32, bfloat16 or float16, "
        "all three the same dtype, contiguous).");

  m.def("cpu_rope", [](const py::object& x_obj, const py::object& cos_obj, const py::object& sin_obj, int64_t heads) {
    tensor_info x = inspect(x_obj, "x"), cs = inspect(cos_obj, "cos"), sn = inspect(sin_obj, "sin");
    expect_dims(x, "x", {-1, -1}, "rows, width");
    expect_dims(cs, "cos", {x.shape[0], -1}, "rows, head_dim");
    const int64_t d = cs.shape[1];
    expect_dims(sn, "sin", {x.shape[0], d}, "rows, head_dim");
    if (d % 2 != 0 || heads < 0 || heads * d > x.shape[1]) {
      throw py::value_error("cpu_rope: " + std::to_string(heads) + " heads of " + std::to_string(d) +
                            " (an even head_dim) must fit in x's rows of " + std::to_string(x.shape[1]));
    }
    expect_host_contiguous(x, "x", x.dtype);
    expect_host_contiguous(cs, "cos", x.dtype);
    expect_host_contiguous(sn, "sin", x.dtype);
    dtype dt;
    throw_if_error(parse_dtype(x.dtype, &dt));
    py::gil_scoped_release nogil;
    cpu_rope(dt, x.shape[0], x.shape[1], heads, d, reinterpret_cast<void*>(x.data), reinterpret_cast<const void*>(cs.data),
             reinterpret_cast<const void*>(sn.data));
  }, py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("heads"),
        "In place: the first `heads` heads (of cos.shape[1]) of each row of x turned by transformers' rotary "
        "embedding (rotate_half convention) with the row's cos / sin; one dtype, contiguous, on the CPU.");

  m.def("cpu_attention", [](const py::object& q_obj, const py::object& k_obj, const py::object& v_obj, int64_t q_heads,
                            double scale, const py::object& out_obj) {
    tensor_info q = inspect(q_obj, "q"), k = inspect(k_obj, "k"), v = inspect(v_obj, "v"), out = inspect(out_obj, "out");
    expect_dims(k, "k", {-1, -1, -1, -1}, "batch, kv_heads, keys, head_dim");
    const int64_t batch = k.shape[0], kv_heads = k.shape[1], keys = k.shape[2], d = k.shape[3];
    expect_dims(v, "v", {batch, kv_heads, keys, d}, "batch, kv_heads, keys, head_dim");
    expect_dims(q, "q", {-1, -1}, "rows, width");
    const int64_t rows = q.shape[0];
    if (batch < 1 || rows % batch != 0 || rows / batch > keys || kv_heads < 1 || q_heads % kv_heads != 0 ||
        q_heads * d > q.shape[1]) {
      throw py::value_error("cpu_attention: q's " + std::to_string(rows) + " rows must be whole rows per sequence of "
                            "the " + std::to_string(batch) + " in k, no more than its " + std::to_string(keys) +
                            " keys, and hold " + std::to_string(q_heads) + " heads (a multiple of k's " +
                            std::to_string(kv_heads) + ") of " + std::to_string(d));
    }
    expect_dims(out, "out", {rows, q_heads * d}, "rows, q_heads * head_dim");
    expect_host_contiguous(q, "q", q.dtype);
    expect_host_rows(k, "k", q.dtype);
    expect_host_rows(v, "v", q.dtype);
    expect_host_contiguous(out, "out", q.dtype);
    dtype dt;
    throw_if_error(parse_dtype(q.dtype, &dt));
    const kv_layout kl{k.strides[0], k.strides[1]}, vl{v.strides[0], v.strides[1]};
    py::gil_scoped_release nogil;
    cpu_attention(dt, batch, rows / batch, q_heads, kv_heads, keys, d, reinterpret_cast<const void*>(q.data), q.shape[1],
                  reinterpret_cast<const void*>(k.data), kl, reinterpret_cast<const void*>(v.data), vl,
                  static_cast<float>(scale), reinterpret_cast<void*>(out.data));
  }, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("q_heads"), py::arg("scale"), py::arg("out"),
        "transformers' attention of the new rows on the CPU: q [batch * new, width] holds q_heads heads at the "
        "start of each row; k, v [batch, kv_heads, keys, head_dim], each head's keys contiguous rows (views of a "
        "larger cache buffer are fine); causal over the new rows (the last of the keys); out [batch * new, "
        "q_heads * head_dim]; one dtype; q and out contiguous.");

  m.def("cpu_route", [](const py::object& x_obj, const py::object& w_obj, int64_t top_k, bool normalize,
                        const py::object& logits_obj, const py::object& weights_obj, const py::object& ids_obj) {
    tensor_info x = inspect(x_obj, "x"), w = inspect(w_obj, "weight"), logits = inspect(logits_obj, "logits"),
                weights = inspect(weights_obj, "weights"), ids = inspect(ids_obj, "ids");
    expect_dims(x, "x", {-1, -1}, "rows, hidden");
    const int64_t rows = x.shape[0], hidden = x.shape[1];
    expect_dims(w, "weight", {-1, hidden}, "experts, hidden");
    const int64_t experts = w.shape[0];
    expect_dims(logits, "logits", {rows, experts}, "rows, experts");
    expect_dims(weights, "weights", {rows, top_k}, "rows, top_k");
    expect_dims(ids, "ids", {rows, top_k}, "rows, top_k");
    expect_host_contiguous(x, "x", x.dtype);
    expect_host_contiguous(w, "weight", x.dtype);
    expect_host_contiguous(logits, "logits", x.dtype);
    expect_host_contiguous(weights, "weights", "float32");
    expect_host_contiguous(ids, "ids", "int64");
    dtype dt;
    throw_if_error(parse_dtype(x.dtype, &dt));
    py::gil_scoped_release nogil;
    throw_if_error(cpu_route(dt, rows, experts, hidden, reinterpret_cast<const void*>(x.data),
                             reinterpret_cast<const void*>(w.data), top_k, normalize, reinterpret_cast<void*>(logits.data),
                             reinterpret_cast<float*>(weights.data), reinterpret_cast<int64_t*>(ids.data)));
  }, py::arg("x"), py::arg("weight"), py::arg("top_k"), py::arg("normalize"), py::arg("logits"), py::arg("weights"),
        py::arg("ids"),
        "A softmax-top-k router on the CPU: logits = x @ weight.T (x, weight, logits in one dtype), softmax in "
        "float32, the top_k largest (weights float32, ids int64, descending), divided by their sum when normalize.");

  m.def("expert_bytes", [](int64_t hidden, int64_t intermediate, const std::string& ffn,
                           const std::string& dt, bool has_bias, const std::string& expert_format,
                           int64_t group_size) {
    expert_spec sp;
    sp.hidden = hidden;
    sp.intermediate = intermediate;
    sp.has_bias = has_bias;
    throw_if_error(parse_weight_format(expert_format, &sp.format));
    sp.group_size = group_size;
    throw_if_error(parse_ffn_kind(ffn, &sp.kind));
    throw_if_error(parse_dtype(dt, &sp.dt));
    throw_if_error(sp.validate());
    return static_cast<int64_t>(sp.bytes());
  }, py::arg("hidden"), py::arg("intermediate"), py::arg("ffn") = "gated_silu",
     py::arg("dtype") = "bfloat16", py::arg("has_bias") = false, py::arg("expert_format") = "dense",
     py::arg("group_size") = 64, "Bytes of one expert in the store and in a slot (padded to 256 bytes).");

  py::class_<py_runtime>(m, "Runtime", R"doc(
The expert runtime of one model.

Parameters
----------
num_layers, num_experts : MoE layers, experts per layer.
hidden, intermediate : H and I of one expert.
ffn : "gated_silu" (Mixtral, Qwen-MoE, OLMoE, DeepSeek), "gated_gelu", "gated_gelu_tanh",
    "gated_relu", "gated_swiglu_oai" (GPT-OSS), "gated_silu_clamped" (HY-V4, GLM-5), or non-gated
    "relu" (SwitchTransformers), "gelu",
    "gelu_tanh", "silu", "relu2" (Nemotron-H).
dtype : "float32", "float16" or "bfloat16".
device : "cpu" or "cuda[:N]".
expert_memory : bytes of device memory for expert slots (int or "8GiB"); None = every expert.
eviction : "lru" or "lfu".
copy_depth : copies handed to the copy engine at once.
has_bias : experts carry biases (parts gate_bias, up_bias, down_bias / in_bias, out_bias).
alpha, limit : the clamps of gated_swiglu_oai and gated_silu_clamped.
expert_format, group_size : "dense" (weights in dtype) or "int8", "int4", "int3", "int2": packed
    codes with an fp16 scale and zero per group of group_size (32, 64, 128) along the input
    dimension; set parts "gate" (uint8 codes [rows, row bytes]), "gate.scale", "gate.zero"
    (float16 [rows, groups]), and so on.
)doc")
      .def(py::init<int32_t, int32_t, int64_t, int64_t, const std::string&, const std::string&,
                    const std::string&, const py::object&, const std::string&, int32_t, bool, float,
                    float, const std::string&, int64_t>(),
           py::arg("num_layers"), py::arg("num_experts"), py::arg("hidden"),
           py::arg("intermediate"), py::kw_only(), py::arg("ffn") = "gated_silu",
           py::arg("dtype") = "bfloat16", py::arg("device") = "cpu",
           py::arg("expert_memory") = py::none(), py::arg("eviction") = "lru",
           py::arg("copy_depth") = 2, py::arg("has_bias") = false, py::arg("alpha") = 1.702f,
           py::arg("limit") = 7.0f, py::arg("expert_format") = "dense", py::arg("group_size") = 64)
      .def_property_readonly("device", &py_runtime::device)
      .def_property_readonly("num_slots", [](py_runtime& self) { return self.rt().num_slots(); })
      .def_property_readonly("expert_bytes", [](py_runtime& self) {
        return static_cast<int64_t>(self.rt().config().spec.bytes());
      })
      .def_property_readonly("closed", [](py_runtime& self) { return self.rt_closed(); })
      .def("set_expert", &py_runtime::set_expert, py::arg("layer"), py::arg("expert"),
           py::arg("part"), py::arg("weight"),
           "Copy one weight of one expert into the expert store. gate/up/in: [I, H], down/out: [H, I],\n"
           "gate_bias/up_bias/in_bias: [I], down_bias/out_bias: [H].")
      .def("host_expert", &py_runtime::host_expert, py::arg("layer"), py::arg("expert"),
           "The bytes of one expert in the expert store.")
      .def("forward", &py_runtime::forward, py::arg("layer"), py::arg("x"), py::arg("ids"),
           py::arg("weights"), py::kw_only(), py::arg("out") = py::none(),
           py::arg("next_layer") = -1, py::arg("next_experts") = py::none(),
           R"doc(One MoE block: out[t] = sum_k weights[t, k] * expert_{ids[t, k]}(x[t]).

x: [T, H] on the runtime's device; ids: [T, K] integers; weights: [T, K] floats (any device).
next_layer / next_experts: experts to prefetch for the next block once this block's experts
hold their slots.)doc")
      .def("forward_resident", &py_runtime::forward_resident, py::arg("layer"), py::arg("x"), py::arg("ids"),
           py::arg("weights"), py::kw_only(), py::arg("out") = py::none(),
           R"doc(One MoE block whose experts are all resident (every expert of the layer pinned and loaded,
as under policy gpu-only): x [T, H], ids [T, K] int32 and weights [T, K] float32, all on the runtime's
device. Experts are found through the device slot table: nothing goes to the host, nothing is
allocated once the workspace holds its rows (see reserve_resident), so it can be captured in a CUDA
graph.)doc")
      .def("forward_device", &py_runtime::forward_device, py::arg("layer"), py::arg("x"), py::arg("ids"),
           py::arg("weights"), py::kw_only(), py::arg("out") = py::none(), py::arg("next_layer") = -1,
           py::arg("next_ids") = py::none(),
           R"doc(One decode-sized MoE block under any budget (up to DEVICE_ROWS_MAX token-expert rows): x [T, H],
ids [T, K] int32 and weights [T, K] float32 on the runtime's device, and nothing goes to the host on
this thread. An expert in no ready slot is read in place from the expert store (over the link on a
GPU). The runtime's route reader learns the routing one step behind: it counts hits and reads in
place, loads the missed experts for later blocks and prefetches next_ids (int32, on the device: the
experts predicted for next_layer).)doc")
      .def_property_readonly("reads_store_in_place", [](py_runtime& self) { return self.rt().reads_store_in_place(); },
                             "Whether forward_device can run: the device reads the pinned expert store in place.")
      .def("reserve_resident", &py_runtime::reserve_resident, py::arg("rows"),
           R"doc(Grows the resident path's workspace to hold `rows` (token, expert) rows now, so that no later
block up to that size allocates (what a CUDA graph that captures one needs); returns the workspace's size
in bytes. A larger block later grows it again, at a new address: compare stats()["resident_workspace_bytes"]
with the size at capture before replaying a graph.)doc")
      .def("slot_table", &py_runtime::slot_table,
           "The device slot table as last built: for every (layer, expert), its slot or -1.")
      .def("prefetch", &py_runtime::prefetch, py::arg("layer"), py::arg("experts"))
      .def("cancel_prefetches", [](py_runtime& self) { throw_if_error(self.rt().cancel_prefetches()); })
      .def("pin", [](py_runtime& self, int32_t l, int32_t e) {
        runtime& r = self.rt();
        py::gil_scoped_release nogil;
        throw_if_error(r.pin({l, e}));
      }, py::arg("layer"), py::arg("expert"))
      .def("unpin", [](py_runtime& self, int32_t l, int32_t e) { throw_if_error(self.rt().unpin({l, e})); },
           py::arg("layer"), py::arg("expert"))
      .def("evict", [](py_runtime& self, int32_t l, int32_t e) { throw_if_error(self.rt().evict({l, e})); },
           py::arg("layer"), py::arg("expert"))
      .def("resize", [](py_runtime& self, const py::object& expert_memory, const std::string& eviction) {
        runtime& r = self.rt();
        eviction_policy ev;
        throw_if_error(parse_eviction_policy(eviction, &ev));
        const int64_t bytes = bytes_arg(expert_memory, "expert_memory");
        py::gil_scoped_release nogil;
        throw_if_error(r.resize(bytes, ev));
      }, py::arg("expert_memory"), py::arg("eviction") = "lru",
         "New slab size and eviction policy; the expert store stays. Slots start empty, stats at zero.")
      .def("wait_idle", [](py_runtime& self) {
        runtime& r = self.rt();
        py::gil_scoped_release nogil;
        throw_if_error(r.wait_idle());
      })
      .def("set_host_lane", &py_runtime::set_host_lane, py::arg("enabled"), py::kw_only(),
           py::arg("plan") = "auto", py::arg("threads") = 0, py::arg("hot_slots") = 0,
           py::arg("hot_decay") = 0.9, py::arg("hot_min") = 1.0, py::arg("rebalance_every") = 8,
           py::arg("link_bandwidth") = 0.0, py::arg("host_bandwidth") = 0.0, py::arg("host_row_seconds") = 0.0,
           R"doc(Policy hybrid: experts not in a slot are copied or computed on the host lane (from the
expert store), as `plan` says: auto (the cost model), host, copy or alternate (tests). The most
routed experts, up to hot_slots, stay pinned. Bandwidths in bytes/s and host_row_seconds left at
0 are measured. Drops the hot set; not while a forward runs.)doc")
      .def("stats", &py_runtime::stats)
      .def("reset_stats", [](py_runtime& self) {
        runtime& r = self.rt();
        py::gil_scoped_release nogil;
        r.reset_stats();
      })
      .def("slots", &py_runtime::slots)
      .def("set_tracing", [](py_runtime& self, bool on) {
        runtime& r = self.rt();
        py::gil_scoped_release nogil;
        throw_if_error(r.set_tracing(on));
      }, py::arg("on"), "Start (clearing earlier records) or stop recording a timeline.")
      .def("trace", &py_runtime::trace,
           "Intervals recorded since set_tracing(True): dicts with kind ('copy' or 'compute'), "
           "layer, expert, start_s, end_s (seconds since tracing started).")
      .def("check", &py_runtime::check,
           "Wait for copies, then verify the cache's invariants and every slot against its host copy.")
      .def("close", &py_runtime::close)
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](py_runtime& self, py::args) { self.close(); });
}
