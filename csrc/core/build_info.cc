#include "pregated/backend.h"
#include "pregated/version.h"
#include "../cpu/cpu_gemm.h"

namespace pregated {

build_info_t build_info() {
  build_info_t info;
#ifdef PREGATED_WITH_CUDA
  info.cuda = true;
#endif
#ifdef PREGATED_CUDA_ARCHS
  info.cuda_archs = PREGATED_CUDA_ARCHS;
#endif
  info.blas = cpu::blas_name();
  info.version = PREGATED_VERSION;
  return info;
}

}  // namespace pregated
