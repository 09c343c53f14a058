// The CUDA backend: the slab is one cudaMalloc, the expert store is pinned host memory, copies
// run on a copy stream of their own and are joined to the caller's compute stream by events,
// GEMMs go through cuBLAS (one handle per calling thread), small kernels in cuda_kernels.cu.
#include <cuda_runtime.h>

#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "cuda_check.h"
#include "cuda_kernels.h"
#include "pregated/backend.h"

namespace pregated {

namespace {

class cuda_event : public backend_event {
 public:
  ~cuda_event() override {
    if (ev != nullptr) cudaEventDestroy(ev);
  }
  cudaEvent_t ev = nullptr;
};

cudaEvent_t raw(backend_event* e) { return static_cast<cuda_event*>(e)->ev; }
cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

cudaDataType_t cuda_type(dtype dt) {
  switch (dt) {
    case dtype::dtype_f32: return CUDA_R_32F;
    case dtype::dtype_f16: return CUDA_R_16F;
    case dtype::dtype_bf16: return CUDA_R_16BF;
  }
  return CUDA_R_32F;
}

class cuda_backend final : public backend {
 public:
  explicit cuda_backend(int device) : device_(device) {}

  status init() {
    PREGATED_CUDA_CHECK(cudaSetDevice(device_));
    PREGATED_CUDA_CHECK(cudaStreamCreateWithFlags(&copy_stream_, cudaStreamNonBlocking));
    cublasHandle_t h = nullptr;
    return handle(&h);  // fails early where cuBLAS cannot start
  }

  ~cuda_backend() override {
    cudaSetDevice(device_);
    if (copy_stream_ != nullptr) {
      cudaStreamSynchronize(copy_stream_);
      cudaStreamDestroy(copy_stream_);
    }
    for (auto& kv : handles_) cublasDestroy(kv.second);
    for (staging& s : staging_) {
      cudaEventDestroy(s.done);
      cudaFreeHost(s.ptr);
    }
  }

  const char* name() const override { return "cuda"; }
  backend_caps caps() const override { return {/*async_copy=*/true, /*device_is_host=*/false}; }
  int device_index() const override { return device_; }

  status alloc_device(size_t bytes, void** ptr) override {
    PREGATED_CUDA_CHECK(cudaSetDevice(device_));
    if (cudaMalloc(ptr, bytes) != cudaSuccess) {
      cudaGetLastError();
      size_t free_b = 0, total_b = 0;
      cudaMemGetInfo(&free_b, &total_b);
      return {status_code::status_code_out_of_memory,
              "cannot allocate " + format_bytes(static_cast<int64_t>(bytes)) + " on cuda:" +
                  std::to_string(device_) + " (" + format_bytes(static_cast<int64_t>(free_b)) +
                  " free of " + format_bytes(static_cast<int64_t>(total_b)) + ")"};
    }
    return {};
  }
  void free_device(void* ptr) override {
    cudaSetDevice(device_);
    cudaFree(ptr);
  }
  status alloc_host(size_t bytes, void** ptr) override {
    PREGATED_CUDA_CHECK(cudaSetDevice(device_));
    if (cudaHostAlloc(ptr, bytes, cudaHostAllocPortable) != cudaSuccess) {
      cudaGetLastError();
      return {status_code::status_code_out_of_memory,
              "cannot allocate " + format_bytes(static_cast<int64_t>(bytes)) +
                  " of pinned host memory"};
    }
    return {};
  }
  void free_host(void* ptr) override { cudaFreeHost(ptr); }
  status alloc_workspace(size_t bytes, void* stream, void** ptr) override {
    PREGATED_CUDA_CHECK(cudaSetDevice(device_));
    PREGATED_CUDA_CHECK(cudaMallocAsync(ptr, bytes, as_stream(stream)));
    return {};
  }
  void free_workspace(void* ptr, void* stream) override {
    cudaSetDevice(device_);
    cudaFreeAsync(ptr, as_stream(stream));
  }

  status create_event(bool timing, std::unique_ptr<backend_event>* out) override {
    PREGATED_CUDA_CHECK(cudaSetDevice(device_));
    auto ev = std::make_unique<cuda_event>();
    // Blocking sync: the copy engine's worker sleeps instead of spinning on a core.
    const unsigned flags = cudaEventBlockingSync | (timing ? 0u : cudaEventDisableTiming);
    PREGATED_CUDA_CHECK(cudaEventCreateWithFlags(&ev->ev, flags));
    *out = std::move(ev);
    return {};
  }

  status copy_wait(backend_event* ev) override {
    PREGATED_CUDA_CHECK(cudaSetDevice(device_));
    PREGATED_CUDA_CHECK(cudaStreamWaitEvent(copy_stream_, raw(ev), 0));
    return {};
  }
  status copy_to_device(void* dst, const void* src, size_t bytes,
                        backend_event* done) override {
    PREGATED_CUDA_CHECK(cudaSetDevice(device_));
    PREGATED_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, copy_stream_));
    if (done != nullptr) PREGATED_CUDA_CHECK(cudaEventRecord(raw(done), copy_stream_));
    return {};
  }
  status record_copy(backend_event* ev) override {
    PREGATED_CUDA_CHECK(cudaSetDevice(device_));
    PREGATED_CUDA_CHECK(cudaEventRecord(raw(ev), copy_stream_));
    return {};
  }
  status wait_host(backend_event* ev) override {
    PREGATED_CUDA_CHECK(cudaEventSynchronize(raw(ev)));
    return {};
  }
  status record(backend_event* ev, void* stream) override {
    PREGATED_CUDA_CHECK(cudaEventRecord(raw(ev), as_stream(stream)));
    return {};
  }
  status stream_wait(backend_event* ev, void* stream) override {
    PREGATED_CUDA_CHECK(cudaStreamWaitEvent(as_stream(stream), raw(ev), 0));
    return {};
  }
  status elapsed_seconds(backend_event* start, backend_event* end, double* out) override {
    float ms = 0;
    PREGATED_CUDA_CHECK(cudaEventElapsedTime(&ms, raw(start), raw(end)));
    *out = ms / 1000.0;
    return {};
  }
  bool query(backend_event* ev) override {
    const cudaError_t err = cudaEventQuery(raw(ev));
    if (err == cudaErrorNotReady) cudaGetLastError();
    return err == cudaSuccess;
  }

  // Through a pinned staging buffer, so the copy is truly asynchronous and the caller's buffer
  // is free at once; a staging buffer is reused only after its copy completed.
  status upload(void* dst, const void* src, size_t bytes, void* stream) override {
    PREGATED_CUDA_CHECK(cudaSetDevice(device_));
    std::lock_guard<std::mutex> lk(staging_mu_);
    staging* buf = nullptr;
    for (staging& s : staging_) {
      if (s.bytes >= bytes && cudaEventQuery(s.done) == cudaSuccess) {
        buf = &s;
        break;
      }
    }
    cudaGetLastError();  // a not-ready query leaves an error behind
    if (buf == nullptr) {
      staging s;
      s.bytes = bytes < 65536 ? 65536 : bytes;
      PREGATED_CUDA_CHECK(cudaHostAlloc(&s.ptr, s.bytes, cudaHostAllocPortable));
      PREGATED_CUDA_CHECK(cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming));
      staging_.push_back(s);
      buf = &staging_.back();
    }
    std::memcpy(buf->ptr, src, bytes);
    PREGATED_CUDA_CHECK(cudaMemcpyAsync(dst, buf->ptr, bytes, cudaMemcpyHostToDevice, as_stream(stream)));
    PREGATED_CUDA_CHECK(cudaEventRecord(buf->done, as_stream(stream)));
    return {};
  }
  status download(void* dst, const void* src, size_t bytes, void* stream) override {
    PREGATED_CUDA_CHECK(cudaSetDevice(device_));
    PREGATED_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, as_stream(stream)));
    return {};
  }
  // Pinned host memory is mapped into every device's address space under unified addressing
  // (every 64-bit process); the runtime asks for the device's name of it all the same.
  status device_address(const void* host, const void** out) override {
    PREGATED_CUDA_CHECK(cudaSetDevice(device_));
    void* dev = nullptr;
    if (cudaHostGetDevicePointer(&dev, const_cast<void*>(host), 0) != cudaSuccess) {
      cudaGetLastError();
      int unified = 0;
      PREGATED_CUDA_CHECK(cudaDeviceGetAttribute(&unified, cudaDevAttrUnifiedAddressing, device_));
      if (!unified) {
        return {status_code::status_code_unavailable,
                "device " + std::to_string(device_) + " cannot map pinned host memory"};
      }
      dev = const_cast<void*>(host);  // unified addressing: the host's pointer is the device's
    }
    *out = dev;
    return {};
  }
  status download_sync(void* dst, const void* src, size_t bytes) override {
    PREGATED_CUDA_CHECK(cudaSetDevice(device_));
    PREGATED_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
    return {};
  }
  status synchronize(void* stream) override {
    PREGATED_CUDA_CHECK(cudaSetDevice(device_));
    if (stream != nullptr) PREGATED_CUDA_CHECK(cudaStreamSynchronize(as_stream(stream)));
    PREGATED_CUDA_CHECK(cudaStreamSynchronize(copy_stream_));
    return {};
  }

  status gemm_nt(dtype dt, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda,
                 const void* b, int64_t ldb, void* c, int64_t ldc, void* stream) override {
    if (m <= 0 || n <= 0) return {};
    cublasHandle_t h = nullptr;
    PREGATED_RETURN_IF_ERROR(handle(&h));
    PREGATED_CUBLAS_CHECK(cublasSetStream(h, as_stream(stream)));
    const float alpha = 1.0f, beta = 0.0f;
    const cudaDataType_t t = cuda_type(dt);
    // Row-major C[m,n] = A[m,k] B[n,k]^T, seen column-major: C^T[n,m] = op_T(B) op_N(A^T).
    PREGATED_CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n),
                                       static_cast<int>(m), static_cast<int>(k), &alpha, b, t,
                                       static_cast<int>(ldb), a, t, static_cast<int>(lda), &beta,
                                       c, t, static_cast<int>(ldc), CUBLAS_COMPUTE_32F,
                                       CUBLAS_GEMM_DEFAULT));
    return {};
  }

  status gemm_nt_quantized(dtype dt, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda,
                           const quantized_matrix& b, void* c, int64_t ldc, void* stream) override {
    if (m <= 0 || n <= 0) return {};
    PREGATED_CUDA_CHECK(cudaSetDevice(device_));
    if (m <= 8) {  // decode: the codes read once, dequantized in registers
      PREGATED_CUDA_CHECK(cuda::launch_quantized_gemv(dt, m, n, k, a, lda, b, c, ldc, as_stream(stream)));
      return {};
    }
    // prefill: B dequantized into stream-ordered scratch, then cuBLAS
    void* w = nullptr;
    PREGATED_RETURN_IF_ERROR(alloc_workspace(static_cast<size_t>(n * k) * dtype_size(dt), stream, &w));
    status st;
    if (cudaError_t e = cuda::launch_dequantize(dt, b, n, k, w, as_stream(stream)); e != cudaSuccess) {
      st = internal_error(std::string("dequantize: ") + cudaGetErrorString(e));
    }
    if (st.is_ok()) st = gemm_nt(dt, m, n, k, a, lda, w, k, c, ldc, stream);
    free_workspace(w, stream);
    return st;
  }

  status gather_rows(dtype dt, void* dst, const void* src, const int32_t* rows, int64_t n_rows,
                     int64_t width, void* stream) override {
    if (n_rows == 0) return {};
    PREGATED_CUDA_CHECK(cuda::launch_gather_rows(dt, dst, src, rows, n_rows, width, as_stream(stream)));
    return {};
  }
  status activate(const expert_spec& sp, void* data, int64_t rows, int64_t ld,
                  void* stream) override {
    if (rows == 0) return {};
    PREGATED_CUDA_CHECK(cuda::launch_activate(sp, data, rows, ld, as_stream(stream)));
    return {};
  }
  status add_bias(dtype dt, void* data, int64_t rows, int64_t width, int64_t ld, const void* bias,
                  void* stream) override {
    if (rows == 0) return {};
    PREGATED_CUDA_CHECK(cuda::launch_add_bias(dt, data, rows, width, ld, bias, as_stream(stream)));
    return {};
  }
  status expert_ffn_resident(const expert_spec& sp, const expert_places& at, const void* x, const int32_t* ids,
                             const float* weights, int64_t tokens, int64_t top_k, void* out, void* ws,
                             void* stream) override {
    // Tables of pointers filled on the device from the ids and the slot table, then one batched
    // GEMM (quantized: dequantize-GEMV) per projection over every (token, expert) row: no host
    // round trip, no allocation.
    const int64_t R = tokens * top_k;
    if (R == 0) return {};
    const dtype dt = sp.dt;
    const size_t esz = dtype_size(dt);
    const int64_t H = sp.hidden, I = sp.intermediate, U = sp.up_rows();
    auto up = [](size_t n) { return (n + 255) & ~size_t{255}; };
    auto* act = static_cast<uint8_t*>(ws);
    auto* y = act + up(static_cast<size_t>(R * U) * esz);
    auto** ptrs = reinterpret_cast<void**>(y + up(static_cast<size_t>(R * H) * esz));
    cuda::resident_tables t{const_cast<const void**>(ptrs), const_cast<const void**>(ptrs + R), ptrs + 2 * R,
                            const_cast<const void**>(ptrs + 3 * R), ptrs + 4 * R,
                            const_cast<const void**>(ptrs + 5 * R), const_cast<const void**>(ptrs + 6 * R),
                            reinterpret_cast<int32_t*>(reinterpret_cast<uint8_t*>(ptrs) + up(static_cast<size_t>(R) * 8 * sizeof(void*)))};
    cudaStream_t s = as_stream(stream);
    PREGATED_CUDA_CHECK(cudaSetDevice(device_));
    PREGATED_CUDA_CHECK(cuda::launch_resident_tables(sp, at, x, ids, R, top_k, act, y, t, s));
    cublasHandle_t h = nullptr;
    if (!sp.quantized()) {
      PREGATED_RETURN_IF_ERROR(handle(&h));
      PREGATED_CUBLAS_CHECK(cublasSetStream(h, s));
    }
    const float alpha = 1.0f, beta = 0.0f;
    const cudaDataType_t ct = cuda_type(dt);
    // Row r: c_r[1, n] = a_r[1, k] W_r[n, k]^T, W_r weight `weight` of row r's expert at w[r];
    // column-major for cuBLAS: c^T[n, 1] = op_T(W) a^T. Quantized weights (w[r]: their codes):
    // one dequantize-GEMV over every row.
    auto project = [&](int weight, int64_t n, int64_t k, const void* const* a, int64_t lda, const void* const* w,
                       void* const* c) -> status {
      if (sp.quantized()) {
        PREGATED_CUDA_CHECK(cuda::launch_quantized_rows(dt, R, n, k, a, w, quantized_part(sp, nullptr, weight), c, s));
        return {};
      }
      PREGATED_CUBLAS_CHECK(cublasGemmBatchedEx(h, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), 1,
                                                static_cast<int>(k), &alpha, w, ct, static_cast<int>(k), a, ct,
                                                static_cast<int>(lda), &beta, c, ct, static_cast<int>(n),
                                                static_cast<int>(R), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      return {};
    };
    PREGATED_RETURN_IF_ERROR(project(0, U, H, t.x, H, t.w_up, t.act));
    if (sp.has_bias) PREGATED_CUDA_CHECK(cuda::launch_add_row_bias(dt, act, R, U, U, t.b_up, s));
    PREGATED_CUDA_CHECK(cuda::launch_activate(sp, act, R, U, s));
    PREGATED_RETURN_IF_ERROR(project(sp.down_part(), H, I, t.act, U, t.w_down, t.y));
    if (sp.has_bias) PREGATED_CUDA_CHECK(cuda::launch_add_row_bias(dt, y, R, H, H, t.b_down, s));
    PREGATED_CUDA_CHECK(cuda::launch_combine(dt, out, y, t.row_of, weights, tokens, top_k, H, s));
    return {};
  }

  status combine(dtype dt, void* out, const void* y, const int32_t* row_of, const float* weights,
                 int64_t tokens, int64_t top_k, int64_t width, void* stream) override {
    if (tokens == 0) return {};
    PREGATED_CUDA_CHECK(cuda::launch_combine(dt, out, y, row_of, weights, tokens, top_k, width,
                                             as_stream(stream)));
    return {};
  }

 private:
  struct staging {
    void* ptr = nullptr;
    size_t bytes = 0;
    cudaEvent_t done = nullptr;
  };

  // cuBLAS handles must not be shared by threads running at once: one per thread.
  status handle(cublasHandle_t* out) {
    std::lock_guard<std::mutex> lk(handles_mu_);
    auto it = handles_.find(std::this_thread::get_id());
    if (it != handles_.end()) {
      *out = it->second;
      return {};
    }
    PREGATED_CUDA_CHECK(cudaSetDevice(device_));
    cublasHandle_t h = nullptr;
    const cublasStatus_t st = cublasCreate(&h);
    if (st != CUBLAS_STATUS_SUCCESS) {
      return {status_code::status_code_unavailable,
              "cuBLAS could not start on cuda:" + std::to_string(device_) + " (status " +
                  std::to_string(static_cast<int>(st)) + ")"};
    }
    handles_[std::this_thread::get_id()] = h;
    *out = h;
    return {};
  }

  int device_;
  cudaStream_t copy_stream_ = nullptr;
  std::mutex handles_mu_;
  std::unordered_map<std::thread::id, cublasHandle_t> handles_;
  std::mutex staging_mu_;
  std::vector<staging> staging_;
};

}  // namespace

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

status make_cuda_backend(int device, std::unique_ptr<backend>* out) {
  const int n = cuda_device_count();
  if (n == 0) {
    return {status_code::status_code_unavailable,
            "no usable CUDA device (no GPU, or no driver); use the CPU backend"};
  }
  if (device < 0 || device >= n) {
    return invalid_argument("cuda:" + std::to_string(device) + " does not exist: " +
                            std::to_string(n) + " CUDA device(s) are visible");
  }
  auto be = std::make_unique<cuda_backend>(device);
  PREGATED_RETURN_IF_ERROR(be->init());
  *out = std::move(be);
  return {};
}

}  // namespace pregated
