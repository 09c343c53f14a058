// Built instead of the CUDA backend when CUDA is not compiled in.
#include "pregated/backend.h"

namespace pregated {

int cuda_device_count() { return 0; }

status make_cuda_backend(int, std::unique_ptr<backend>*) {
  return {status_code::status_code_unavailable,
          "this build of pregated has no CUDA backend: rebuild with nvcc and cuBLAS available "
          "(pip install nvidia-cublas), or pass -C cmake.define.PREGATED_CUDA=ON to require it"};
}

}  // namespace pregated
