#include "cpu_gemm.h"

#include <algorithm>
#include <cstdlib>
#include <string>
#include <string>
#include <thread>
#include <vector>

#include "amx_rows.h"
#include "bf16_pairs.h"
#include "half.h"
#include "quantized_int8.h"
#include "quantized_rows.h"
#include "small_rows.h"
#include "thread_pool.h"

#include <cblas.h>  // scipy-openblas32: OpenBLAS with a scipy_ symbol prefix

namespace pregated::cpu {

namespace {

// Conversions run once per weight element per call, so they are built for several vector
// widths and the loader picks the best the CPU has (GCC function multiversioning).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_THREAD__) && !defined(__SANITIZE_ADDRESS__)
#define PREGATED_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PREGATED_VECTOR_CLONES
#endif

PREGATED_VECTOR_CLONES
void widen(dtype dt, const void* src, int64_t rows, int64_t cols, int64_t ld, float* dst) {
  const uint16_t* s = static_cast<const uint16_t*>(src);
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* in = s + r * ld;
    float* out = dst + r * cols;
    if (dt == dtype::dtype_bf16) {
      for (int64_t c = 0; c < cols; ++c) out[c] = bf16_to_f32(in[c]);
    } else {
      for (int64_t c = 0; c < cols; ++c) out[c] = f16_to_f32(in[c]);
    }
  }
}

PREGATED_VECTOR_CLONES
void narrow(dtype dt, const float* src, int64_t rows, int64_t cols, int64_t src_ld, void* dst,
            int64_t ld) {
  uint16_t* d = static_cast<uint16_t*>(dst);
  for (int64_t r = 0; r < rows; ++r) {
    const float* in = src + r * src_ld;
    uint16_t* out = d + r * ld;
    if (dt == dtype::dtype_bf16) {
      for (int64_t c = 0; c < cols; ++c) out[c] = f32_to_bf16(in[c]);
    } else {
      for (int64_t c = 0; c < cols; ++c) out[c] = f32_to_f16(in[c]);
    }
  }
}

void sgemm_nt(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
              int64_t ldb, float* c, int64_t ldc) {
  scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<blasint>(m),
                    static_cast<blasint>(n), static_cast<blasint>(k), 1.0f, a,
                    static_cast<blasint>(lda), b, static_cast<blasint>(ldb), 0.0f, c,
                    static_cast<blasint>(ldc));
}

// Column blocks of at least this much weight per pool task (smaller ones cost more to hand out
// than to compute).
constexpr int64_t min_task_bytes = 256 << 10;

// bf16 GEMMs of more rows than a decode on vdpbf16ps with B repacked as pairs of k (bf16_pairs.h)
// where AMX does not take them; PREGATED_BF16_PAIRS=0 widens B to fp32 for sgemm instead.
bool bf16_pairs_chosen() {
  static const bool off = [] {
    const char* v = std::getenv("PREGATED_BF16_PAIRS");
    return v != nullptr && std::string(v) == "0";
  }();
  return !off && bf16dot_chosen();
}

int64_t tasks_for(int64_t n, int64_t bytes_per_column) {
  const int64_t threads = thread_pool::current().size();
  const int64_t by_size = std::max<int64_t>(1, n * bytes_per_column / min_task_bytes);
  return std::max<int64_t>(1, std::min({n, by_size, 4 * threads}));
}

void sgemm_single(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                  int64_t ldb, float* c, int64_t ldc) {
  // OpenBLAS threads would spin after the call and slow PyTorch's next op: the pool splits
  // the work, OpenBLAS runs one thread inside each task.
  static const bool single = [] {
    scipy_openblas_set_num_threads(1);
    return true;
  }();
  (void)single;
  sgemm_nt(m, n, k, a, lda, b, ldb, c, ldc);
}

// Where the fp32 result goes: C itself when it is fp32, else `c32` ([m, n], narrowed into C after).
float* fp32_output(dtype dt, void* c, int64_t m, int64_t n, std::vector<float>* c32, int64_t* ld) {
  if (dt == dtype::dtype_f32) return static_cast<float*>(c);
  c32->resize(static_cast<size_t>(m * n));
  *ld = n;
  return c32->data();
}

// Columns [j0, j1) of a half-precision C from their fp32 sums (row stride cf_ld), by the task that
// summed them, while they are in its cache: one pass over all of C after the pool took 2% of the
// int4 host lane at 8 rows, on one core.
void narrow_columns(dtype dt, const float* cf, int64_t cf_ld, int64_t m, int64_t j0, int64_t j1, void* c, int64_t ldc) {
  if (dt != dtype::dtype_f32) narrow(dt, cf + j0, m, j1 - j0, cf_ld, static_cast<uint16_t*>(c) + j0, ldc);
}

// A (bf16) packed for the tiles, on the pool where it is large (prefill: 1024 x 1536 took 0.28 ms
// on one core).
amx_input pack_on_pool(int64_t m, int64_t k, const uint16_t* a, int64_t lda, thread_pool& pool) {
  amx_input in = amx_buffer(m, k);
  pool.run_split(in.blocks, m * k >= (int64_t{1} << 17),
                 [&](int64_t blk0, int64_t blk1) { pack_amx_blocks(in, a, lda, blk0, blk1); });
  return in;
}

}  // namespace

status gemm_nt(dtype dt, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda,
               const void* b, int64_t ldb, void* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return {};
  const size_t esz = dtype_size(dt);
  thread_pool& pool = thread_pool::current();
  // bf16 from two rows on AMX tiles (B read once per 16 rows of A); one row is faster on vdpbf16ps
  // (10-15% on 0.5-11 MiB weights, the same beyond; from two rows the tiles were 1.1-2.3x faster).
  if (dt == dtype::dtype_bf16 && m >= 2 && amx_chosen() && amx_shape_ok(k)) {
    const amx_input in = pack_on_pool(m, k, static_cast<const uint16_t*>(a), lda, pool);
    const int64_t tasks = tasks_for((n + 31) / 32, 32 * k * 2);
    const int64_t per = ((n + 31) / 32 + tasks - 1) / tasks * 32;  // whole pairs of tiles
    pool.run(tasks, [&](int64_t t) {
      const int64_t j0 = t * per, j1 = std::min(n, j0 + per);
      if (j0 < j1) amx_rows(in, static_cast<const uint16_t*>(b), ldb, j0, j1, static_cast<uint16_t*>(c), ldc);
    });
    return {};
  }
  // bf16 beyond a decode's rows where AMX does not take them: without AMX, widening B for sgemm
  // took about 3x PyTorch's (oneDNN's) time from 16 rows on (AVX-512 BF16 host, H=1024, I=2816).
  if (dt == dtype::dtype_bf16 && m > small_rows_max && bf16_pairs_chosen()) {
    const std::vector<uint32_t> ap = bf16_pairs_of(m, k, static_cast<const uint16_t*>(a), lda);
    std::vector<float> c32;
    int64_t cf_ld = ldc;
    float* cf = fp32_output(dt, c, m, n, &c32, &cf_ld);
    const int64_t blocks = (n + 63) / 64;
    const int64_t tasks = tasks_for(blocks, 64 * k * 2);
    const int64_t per = (blocks + tasks - 1) / tasks * 64;
    pool.run(tasks, [&](int64_t t) {
      const int64_t j0 = t * per, j1 = std::min(n, j0 + per);
      if (j0 >= j1) return;
      bf16_pairs_gemm(m, k, ap.data(), static_cast<const uint16_t*>(b), ldb, j0, j1, cf, cf_ld);
      narrow_columns(dt, cf, cf_ld, m, j0, j1, c, ldc);
    });
    return {};
  }
  // A and C in fp32 (A is small: the activations of a few rows).
  std::vector<float> a32, c32;
  const float* af = static_cast<const float*>(a);
  int64_t af_ld = lda;
  if (dt != dtype::dtype_f32) {
    a32.resize(static_cast<size_t>(m * k));
    widen(dt, a, m, k, lda, a32.data());
    af = a32.data();
    af_ld = k;
  }
  int64_t cf_ld = ldc;
  float* cf = fp32_output(dt, c, m, n, &c32, &cf_ld);
  if (m <= small_rows_max) {  // decode: one pass over B, read in its own precision
    std::vector<float> a_packed;
    if (af_ld != k) {
      a_packed.resize(static_cast<size_t>(m * k));
      for (int64_t i = 0; i < m; ++i) std::copy(af + i * af_ld, af + i * af_ld + k, a_packed.begin() + i * k);
      af = a_packed.data();
    }
    const int64_t tasks = tasks_for(n, k * static_cast<int64_t>(esz));
    const int64_t per = (n + tasks - 1) / tasks;
    pool.run(tasks, [&](int64_t t) {
      const int64_t j0 = t * per, j1 = std::min(n, j0 + per);
      if (j0 >= j1) return;
      small_rows(dt, m, k, af, b, ldb, j0, j1, cf, cf_ld);
      narrow_columns(dt, cf, cf_ld, m, j0, j1, c, ldc);
    });
  } else if (dt == dtype::dtype_f32) {
    const int64_t tasks = tasks_for(n, k * 4);
    const int64_t per = (n + tasks - 1) / tasks;
    const float* bf = static_cast<const float*>(b);
    pool.run(tasks, [&](int64_t t) {
      const int64_t j0 = t * per, j1 = std::min(n, j0 + per);
      if (j0 < j1) sgemm_single(m, j1 - j0, k, af, af_ld, bf + j0 * ldb, ldb, cf + j0, cf_ld);
    });
  } else {
    // OpenBLAS has no half-precision GEMM in this build: each task widens tiles of B (about
    // 1 MiB of fp32) and runs sgemm on them, so the extra memory stays small.
    const int64_t tile = std::max<int64_t>(16, (int64_t{1} << 18) / std::max<int64_t>(k, 1));
    const int64_t tiles = (n + tile - 1) / tile;
    const uint16_t* b16 = static_cast<const uint16_t*>(b);
    pool.run(tiles, [&](int64_t t) {
      const int64_t j0 = t * tile, nb = std::min(tile, n - j0);
      std::vector<float> b32(static_cast<size_t>(nb * k));
      widen(dt, b16 + j0 * ldb, nb, k, ldb, b32.data());
      sgemm_single(m, nb, k, af, af_ld, b32.data(), k, cf + j0, cf_ld);
      narrow_columns(dt, cf, cf_ld, m, j0, j0 + nb, c, ldc);
    });
  }
  return {};
}

status gemm_nt_items(dtype dt, const rows_item* items, int64_t count, int64_t n, int64_t k) {
  if (count <= 0 || n <= 0) return {};
  std::vector<int64_t> first(static_cast<size_t>(count) + 1, 0);  // each item's first row
  for (int64_t i = 0; i < count; ++i) {
    if (items[i].m < 1 || items[i].m > small_rows_max) {
      return invalid_argument("gemm_nt_items: an item has " + std::to_string(items[i].m) + " rows; 1 to " +
                              std::to_string(small_rows_max) + " are allowed");
    }
    first[static_cast<size_t>(i) + 1] = first[static_cast<size_t>(i)] + items[i].m;
  }
  const int64_t rows = first.back();
  const bool several_rows = std::any_of(items, items + count, [](const rows_item& it) { return it.m >= 2; });
  if (dt == dtype::dtype_bf16 && several_rows && amx_chosen() && amx_shape_ok(k)) {  // as gemm_nt; 32 columns a unit
    std::vector<amx_input> in(static_cast<size_t>(count));
    for (int64_t i = 0; i < count; ++i) in[static_cast<size_t>(i)] = pack_amx(items[i].m, k, static_cast<const uint16_t*>(items[i].a), items[i].lda);
    const int64_t units = (n + 31) / 32, total = count * units;
    const int64_t tasks = tasks_for(total, 32 * k * 2);
    const int64_t per = (total + tasks - 1) / tasks;
    thread_pool::current().run(tasks, [&](int64_t t) {
      for (int64_t s = t * per, e = std::min(total, s + per); s < e;) {  // units s..e of all items
        const int64_t i = s / units, u0 = s % units, u1 = std::min(units, u0 + (e - s));
        amx_rows(in[static_cast<size_t>(i)], static_cast<const uint16_t*>(items[i].b), k, u0 * 32,
                 std::min(n, u1 * 32), static_cast<uint16_t*>(items[i].c), items[i].ldc);
        s += u1 - u0;
      }
    });
    return {};
  }
  std::vector<float> a32(static_cast<size_t>(rows * k)), c32(static_cast<size_t>(dt == dtype::dtype_f32 ? 0 : rows * n));
  for (int64_t i = 0; i < count; ++i) {
    const rows_item& it = items[i];
    float* dst = a32.data() + first[static_cast<size_t>(i)] * k;
    if (dt == dtype::dtype_f32) {
      for (int64_t r = 0; r < it.m; ++r) {
        const float* src = static_cast<const float*>(it.a) + r * it.lda;
        std::copy(src, src + k, dst + r * k);
      }
    } else {
      widen(dt, it.a, it.m, k, it.lda, dst);
    }
  }
  const int64_t esz = static_cast<int64_t>(dtype_size(dt)), total = count * n;
  const int64_t tasks = tasks_for(total, k * esz);
  const int64_t per = (total + tasks - 1) / tasks;
  thread_pool::current().run(tasks, [&](int64_t t) {
    for (int64_t s = t * per, e = std::min(total, s + per); s < e;) {  // columns s..e of all items
      const int64_t i = s / n, j0 = s % n, j1 = std::min(n, j0 + (e - s));
      const size_t f = static_cast<size_t>(first[static_cast<size_t>(i)]);
      const rows_item& it = items[i];
      if (dt == dtype::dtype_f32) {  // straight into C
        small_rows(dt, it.m, k, a32.data() + f * static_cast<size_t>(k), it.b, k, j0, j1, static_cast<float*>(it.c), it.ldc);
      } else {
        float* cf = c32.data() + f * static_cast<size_t>(n);
        small_rows(dt, it.m, k, a32.data() + f * static_cast<size_t>(k), it.b, k, j0, j1, cf, n);
        narrow_columns(dt, cf, n, it.m, j0, j1, it.c, it.ldc);
      }
      s += j1 - j0;
    }
  });
  return {};
}

status gemm_nt_quantized(dtype dt, int64_t m, int64_t n, int64_t k, const void* a, int64_t lda,
                         const quantized_matrix& b, void* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return {};
  thread_pool& pool = thread_pool::current();
  // Prefill of a bf16 model on AMX: tiles of B dequantized to bf16 (about 256 KiB per task), then
  // the bf16 tiles. fp32 dequantization and sgemm took 4.6x the bf16 experts' time on a 1000-token
  // int4 prefill, a third of it in the scalar dequantization.
  if (m > small_rows_max && dt == dtype::dtype_bf16 && amx_chosen() && amx_dequantize_ok(b, k)) {
    const amx_input in = pack_on_pool(m, k, static_cast<const uint16_t*>(a), lda, pool);
    const int64_t tile = std::max<int64_t>(32, (int64_t{1} << 17) / k / 32 * 32);
    const int64_t tiles = (n + tile - 1) / tile;
    pool.run(tiles, [&](int64_t t) {
      const int64_t j0 = t * tile, nb = std::min(tile, n - j0);
      const bf16_buffer w = aligned_array<uint16_t>(nb * k);
      amx_dequantize(b, j0, j0 + nb, w.get());
      amx_rows(in, w.get(), k, 0, nb, static_cast<uint16_t*>(c) + j0, ldc);
    });
    return {};
  }
  // The same without AMX, on AVX-512 BF16: the dequantized tiles through bf16_pairs.
  if (m > small_rows_max && dt == dtype::dtype_bf16 && bf16_pairs_chosen() && amx_dequantize_ok(b, k)) {
    const std::vector<uint32_t> ap = bf16_pairs_of(m, k, static_cast<const uint16_t*>(a), lda);
    std::vector<float> c32;
    int64_t cf_ld = ldc;
    float* cf = fp32_output(dt, c, m, n, &c32, &cf_ld);
    const int64_t tile = std::max<int64_t>(64, (int64_t{1} << 17) / k / 64 * 64);
    const int64_t tiles = (n + tile - 1) / tile;
    pool.run(tiles, [&](int64_t t) {
      const int64_t j0 = t * tile, nb = std::min(tile, n - j0);
      const bf16_buffer w = aligned_array<uint16_t>(nb * k);
      amx_dequantize(b, j0, j0 + nb, w.get());
      bf16_pairs_gemm(m, k, ap.data(), w.get(), k, 0, nb, cf + j0, cf_ld);
      narrow_columns(dt, cf, cf_ld, m, j0, j0 + nb, c, ldc);
    });
    return {};
  }
  std::vector<float> a32(static_cast<size_t>(m * k));  // A compact fp32
  if (dt == dtype::dtype_f32) {
    for (int64_t i = 0; i < m; ++i) {
      std::copy(static_cast<const float*>(a) + i * lda, static_cast<const float*>(a) + i * lda + k, a32.begin() + i * k);
    }
  } else {
    widen(dt, a, m, k, lda, a32.data());
  }
  std::vector<float> c32;
  int64_t cf_ld = ldc;
  float* cf = fp32_output(dt, c, m, n, &c32, &cf_ld);
  // Decode on int8 tiles, 16 columns a tile: int8 codes at any row count; int4 from 2 rows (in
  // pieces, amx_rows.cc), one row vpdpbusd on the packed codes. The host lane's Mixtral expert
  // (benchmarks/tools/host_lane.py, alternated runs) at 2 rows: 22.5-22.8 GB/s on the tiles
  // against 20.9-21.0 with vpdpbusd, since the activations' tiles are 64-byte aligned (before:
  // 15.7-17.0 against 16.2-19.4).
  if (m <= small_rows_max && amx_chosen() && amx_codes_ok(b, m, k) && (b.bits == 8 || m >= 2)) {
    const amx_codes_input in = pack_amx_codes(m, k, a32.data(), b);
    const int64_t tiles = (n + 15) / 16;
    const int64_t tasks = tasks_for(tiles, 16 * b.row_bytes);
    const int64_t per = (tiles + tasks - 1) / tasks * 16;
    pool.run(tasks, [&](int64_t t) {
      const int64_t j0 = t * per, j1 = std::min(n, j0 + per);
      if (j0 >= j1) return;
      amx_codes(in, b, j0, j1, cf, cf_ld);
      narrow_columns(dt, cf, cf_ld, m, j0, j1, c, ldc);
    });
  } else if (m <= small_rows_max && int8_rows_usable(b)) {  // decode: integer dot products on codes read once
    const int8_rows_input in = prepare_int8_rows(m, k, a32.data(), b);
    const int64_t tasks = tasks_for(n, b.row_bytes);
    const int64_t per = (n + tasks - 1) / tasks;
    pool.run(tasks, [&](int64_t t) {
      const int64_t j0 = t * per, j1 = std::min(n, j0 + per);
      if (j0 >= j1) return;
      int8_rows(in, b, j0, j1, cf, cf_ld);
      narrow_columns(dt, cf, cf_ld, m, j0, j1, c, ldc);
    });
  } else if (m <= small_rows_max) {  // decode: codes read once, dequantized in registers
    std::vector<float> sums(static_cast<size_t>(m * b.groups));
    quantized_group_sums(m, k, a32.data(), b.group_size, b.groups, sums.data());
    const int64_t tasks = tasks_for(n, b.row_bytes);
    const int64_t per = (n + tasks - 1) / tasks;
    pool.run(tasks, [&](int64_t t) {
      const int64_t j0 = t * per, j1 = std::min(n, j0 + per);
      if (j0 >= j1) return;
      quantized_rows(m, k, a32.data(), sums.data(), b, j0, j1, cf, cf_ld);
      narrow_columns(dt, cf, cf_ld, m, j0, j1, c, ldc);
    });
  } else {  // prefill: tiles of B dequantized to fp32 (about 1 MiB per task), then sgemm
    const int64_t tile = std::max<int64_t>(16, (int64_t{1} << 18) / std::max<int64_t>(k, 1));
    const int64_t tiles = (n + tile - 1) / tile;
    pool.run(tiles, [&](int64_t t) {
      const int64_t j0 = t * tile, nb = std::min(tile, n - j0);
      std::vector<float> b32(static_cast<size_t>(nb * k));
      dequantize_rows(b, k, j0, j0 + nb, b32.data());
      sgemm_single(m, nb, k, a32.data(), k, b32.data(), k, cf + j0, cf_ld);
      narrow_columns(dt, cf, cf_ld, m, j0, j0 + nb, c, ldc);
    });
  }
  return {};
}

const char* blas_name() {
  static const std::string name =
      std::string("OpenBLAS (scipy-openblas32) sgemm, one thread per task of pregated's pool; up to 8 rows: "
                  "pregated's kernel reading fp32/bf16/fp16 weights once (") +
      small_rows_isa() + "); " +
      (amx_usable() ? "bfloat16 from 2 rows and int8/int4 codes on AMX tiles, float16 widened to float32 in tiles above"
                    : "float16/bfloat16 widened to float32 in tiles above");
  return name.c_str();
}

}  // namespace pregated::cpu
