// The one small interface every backend implements (CPU, CUDA).
//
// Two kinds of callers use it:
//   * the copy engine's worker thread: copy_to_device, wait_host;
//   * the thread that runs a MoE block, on the caller's compute stream: everything else.
// A "stream" is an opaque handle: a cudaStream_t on CUDA, ignored on the CPU, where compute is
// synchronous in the calling thread. Backends without asynchronous copies (caps.async_copy ==
// false) finish a copy before copy_to_device returns; the scheduling code is the same.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "pregated/status.h"
#include "pregated/types.h"

#if defined(__CUDACC__)
#define PREGATED_HOST_DEVICE __host__ __device__
#else
#define PREGATED_HOST_DEVICE
#endif

namespace pregated {

// A quantized weight matrix B [n, k] in an expert's block (see expert_spec): its codes, and the
// fp16 scale and zero of each group of group_size columns.
struct quantized_matrix {
  int bits = 0;
  int64_t group_size = 0;
  const uint8_t* codes = nullptr;  // [n, row_bytes]
  int64_t row_bytes = 0;
  const uint16_t* scales = nullptr;  // [n, groups] fp16
  const uint16_t* zeros = nullptr;   // [n, groups] fp16
  int64_t groups = 0;
};

// Weight matrix w (0 gate/in, ..., last down/out) of the quantized expert whose block starts at
// `block`. Gate and up are adjacent in every section, so the view of w = 0 with n = 2I rows is
// the first GEMM's whole [gate; up] matrix.
quantized_matrix quantized_part(const expert_spec& sp, const uint8_t* block, int weight);

// Where the resident kernels find a layer's experts: slot_of[e] >= 0, the slot's block in the
// slab; -1, the expert's block in the expert store, read in place through `store` (the layer's
// store block as the device addresses it), or, where `store` is null, nowhere: every expert the
// ids name must then be in a slot.
struct expert_places {
  const uint8_t* slab = nullptr;
  size_t slot_bytes = 0;
  const int32_t* slot_of = nullptr;  // [num_experts] device memory
  const uint8_t* store = nullptr;
  size_t expert_bytes = 0;
  PREGATED_HOST_DEVICE const uint8_t* expert(int32_t e, int32_t slot) const {
    return slot >= 0 ? slab + static_cast<size_t>(slot) * slot_bytes
                     : store == nullptr ? nullptr : store + static_cast<size_t>(e) * expert_bytes;
  }
};

// A point in a stream that other work can wait for.
class backend_event {
 public:
  virtual ~backend_event() = default;
};

struct backend_caps {
  bool async_copy = false;     // copies overlap compute on another engine
  bool device_is_host = true;  // "device" memory is ordinary host memory
};

class backend {
 public:
  virtual ~backend() = default;

  virtual const char* name() const = 0;
  virtual backend_caps caps() const = 0;
  virtual int device_index() const { return -1; }

  // Memory. Device memory holds the slab; host memory holds the expert store (pinned where
  // the backend can copy from it asynchronously).
  virtual status alloc_device(size_t bytes, void** ptr) = 0;
  virtual void free_device(void* ptr) = 0;
  virtual status alloc_host(size_t bytes, void** ptr) = 0;
  virtual void free_host(void* ptr) = 0;
  // Scratch memory ordered on a compute stream (freed after the work enqueued before it).
  virtual status alloc_workspace(size_t bytes, void* stream, void** ptr) = 0;
  virtual void free_workspace(void* ptr, void* stream) = 0;

  // Events. `timing` events can be passed to elapsed_seconds.
  virtual status create_event(bool timing, std::unique_ptr<backend_event>* out) = 0;

  // --- copy engine side -------------------------------------------------------------------
  // Later copies wait for `ev` (recorded on a compute stream) to complete.
  virtual status copy_wait(backend_event* ev) = 0;
  // Copy host -> device on the copy engine, then record `done` (may be null).
  virtual status copy_to_device(void* dst, const void* src, size_t bytes,
                                backend_event* done) = 0;
  // Record `ev` on the copy engine, after the copies handed over so far (timelines).
  virtual status record_copy(backend_event* ev) = 0;
  // Block the calling thread until `ev` has completed.
  virtual status wait_host(backend_event* ev) = 0;

  // --- compute side (stream = the caller's compute stream) --------------------------------
  virtual status record(backend_event* ev, void* stream) = 0;
  // Make later work on `stream` wait for `ev` (on the CPU: block until it completed).
  virtual status stream_wait(backend_event* ev, void* stream) = 0;
  // Seconds between two recorded timing events; both must have completed.
  virtual status elapsed_seconds(backend_event* start, backend_event* end, double* out) = 0;
  virtual bool query(backend_event* ev) = 0;

  // Small host -> device upload ordered on `stream`; the host buffer may be reused at once.
  virtual status upload(void* dst, const void* src, size_t bytes, void* stream) = 0;
  // Device -> host copy ordered on `stream` into host memory from alloc_host (it has landed once
  // an event recorded after it completed); nothing waits for it here.
  virtual status download(void* dst, const void* src, size_t bytes, void* stream) = 0;
  // Device -> host copy that has completed when it returns (tests, consistency checks).
  virtual status download_sync(void* dst, const void* src, size_t bytes) = 0;
  // The address through which kernels read host memory from alloc_host in place (over the link
  // on a GPU); the same pointer where the device is the host.
  virtual status device_address(const void* host, const void** out) = 0;
  virtual status synchronize(void* stream) = 0;

  // C[m, n] = A[m, k] * B[n, k]^T; row-major, leading dimensions in elements, fp32 accumulate.
  virtual status gemm_nt(dtype dt, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda,
                         const void* b, int64_t ldb, void* c, int64_t ldc, void* stream) = 0;
  // The same with B quantized: C[m, n] = A[m, k] * dequantize(B)[n, k]^T (A and C in dt).
  virtual status gemm_nt_quantized(dtype dt, int64_t m, int64_t n, int64_t k, const void* a,
                                   int64_t lda, const quantized_matrix& b, void* c, int64_t ldc,
                                   void* stream) = 0;
  // dst[r, :] = src[rows[r], :] for r < n_rows; rows is a device int32 array.
  virtual status gather_rows(dtype dt, void* dst, const void* src, const int32_t* rows,
                             int64_t n_rows, int64_t width, void* stream) = 0;
  // In place on data[rows, ld] in spec.dt, width = spec.intermediate: gated kinds read
  // [gate | up] (2*width columns) and write act(gate) * up (see ffn_kind) into the first
  // `width` columns; non-gated kinds apply act to `width` columns.
  virtual status activate(const expert_spec& spec, void* data, int64_t rows, int64_t ld,
                          void* stream) = 0;
  // In place: data[r, j] += bias[j] for r < rows, j < width (data and bias in dt).
  virtual status add_bias(dtype dt, void* data, int64_t rows, int64_t width, int64_t ld,
                          const void* bias, void* stream) = 0;
  // out[t, :] = sum_k weights[t, k] * y[row_of[t, k], :]   (row_of, weights: device arrays)
  virtual status combine(dtype dt, void* out, const void* y, const int32_t* row_of,
                         const float* weights, int64_t tokens, int64_t top_k, int64_t width,
                         void* stream) = 0;

  // The resident block (runtime::moe_forward_resident and moe_forward_device), its activations
  // and routing in device memory: row r = t * K + k runs expert ids[r]'s FFN, its weights where
  // `at` places it (a slot, or the expert store read in place), on x[t]; then
  // out[t] = sum_k weights[r] * y[r]. `ws` holds resident_workspace_bytes(sp, T * K) bytes.
  virtual status expert_ffn_resident(const expert_spec& sp, const expert_places& at, const void* x,
                                     const int32_t* ids, const float* weights, int64_t tokens,
                                     int64_t top_k, void* out, void* ws, void* stream) = 0;
};

// One expert's FFN on `be`, its weights in the block `w` (a slot, or the expert store on a
// backend whose device is the host): y[n, H] = down(f(x[n, H] [gate; up]^T + b1)) + b2, with
// bias and activation per ffn kind. `act` is scratch of n * sp.up_rows() elements of sp.dt; x,
// act and y are rows of H, U and H elements.
status expert_ffn(backend& be, const expert_spec& sp, const uint8_t* w, const void* x, int64_t n,
                  void* act, void* y, void* stream);

struct cpu_backend_options {
  // >= 0: copies run asynchronously on the backend's copy thread, each after this many
  // microseconds (so the runtime's paths for copies in flight run on the CPU, as on a GPU);
  // < 0 (default): each copy is done before copy_to_device returns.
  int64_t copy_delay_us = -1;
};

// The CPU backend: always available.
std::unique_ptr<backend> make_cpu_backend(const cpu_backend_options& opts = {});

// The CPU backend's few-row (decode) kernels: the instruction set they use on this CPU
// ("avx512", "avx2" or "portable"), and a way for tests to force a path this CPU can run
// (false when it cannot).
const char* cpu_kernel_isa();
bool cpu_kernel_force(const std::string& isa);
// transformers' RMSNorm of `rows` rows of n on the host (x, w, out in dt): float32 inside,
// y = x * rsqrt(mean(x^2) + eps) rounded to dt, times w; many rows go over the CPU pool.
void cpu_rms_norm(dtype dt, int64_t rows, int64_t n, const void* x, const void* w, float eps, void* out);
// A softmax-top-k router on the host (transformers' Mixtral, Qwen and OLMoE routers): logits[rows,
// experts] = x[rows, hidden] w[experts, hidden]^T in dt (x, w, logits in dt), then softmax in
// float32, the k largest in descending order (weights float32, ids), divided by their sum when
// `normalize`.
// transformers' Llama-style attention of a few new rows on the host (see cpu/decode_attention.h):
// rotary embedding in place on the first `heads` heads of each row of x [rows, width]; then the
// attention of q (row stride q_width) against k, v [batch, kv_heads, keys, d] (heads placed by
// their kv_layout) into out.
void cpu_rope(dtype dt, int64_t rows, int64_t width, int64_t heads, int64_t d, void* x, const void* cos,
              const void* sin);
// Where a key/value head starts, in elements: b * batch_stride + h * head_stride (its keys are
// contiguous rows of d).
struct kv_layout {
  int64_t batch_stride = 0, head_stride = 0;
};
void cpu_attention(dtype dt, int64_t batch, int64_t new_rows, int64_t q_heads, int64_t kv_heads, int64_t keys,
                   int64_t d, const void* q, int64_t q_width, const void* k, kv_layout k_layout, const void* v,
                   kv_layout v_layout, float scale, void* out);
status cpu_route(dtype dt, int64_t rows, int64_t experts, int64_t hidden, const void* x, const void* w, int64_t k,
                 bool normalize, void* logits, float* weights, int64_t* ids);
// Host memory read bandwidth in GB/s: the best of five parallel reads of a `bytes` buffer on
// the CPU backend's pool (0 when it cannot be allocated).
double cpu_read_gbps(size_t bytes);
// Threads of the CPU backend's pool (default: one per core, or PREGATED_NUM_THREADS); set
// while no MoE block runs on the CPU backend. 0 restores the default.
int cpu_threads();
void set_cpu_threads(int threads);
// How long the pool's threads spin for the next job before they sleep, in microseconds (default
// 50, PREGATED_SPIN_US); a CPU decode loop raises it while it runs.
int cpu_spin_us();
void set_cpu_spin_us(int us);

// The CUDA backend on `device`; fails with status_code_unavailable when CUDA was not compiled
// in or no usable device exists.
status make_cuda_backend(int device, std::unique_ptr<backend>* out);

// Usable CUDA devices right now (0 without a driver, or when CUDA was not compiled in).
int cuda_device_count();

// Scratch of expert_ffn_resident for `rows` (token, expert) rows: their activations, outputs,
// and the pointer tables a batched GEMM reads.
size_t resident_workspace_bytes(const expert_spec& sp, int64_t rows);

struct build_info_t {
  bool cuda = false;       // CUDA backend compiled in
  std::string blas;        // library behind the CPU backend's GEMMs
  std::string version;
  std::string cuda_archs;  // architectures the CUDA kernels were built for
};
build_info_t build_info();

}  // namespace pregated
