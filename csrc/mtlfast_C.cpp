// Python entry of the CUDA extension: build facts (pybind11) and the op schemas
// (torch.library), whose CUDA kernels live in the .cu files.
#include <torch/extension.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#define MTLFAST_STR_(x) #x
#define MTLFAST_STR(x) MTLFAST_STR_(x)

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["cuda_archs"] = std::string(MTLFAST_STR(MTLFAST_CUDA_ARCHS));
  info["cuda_runtime_version"] = CUDART_VERSION;
  info["torch_version"] = std::string(TORCH_VERSION);
  return info;
}

}  // namespace

TORCH_LIBRARY(mtlfast_C, m) {
  m.def("accumulate_fp32_(Tensor(a!) main_grad, Tensor grad) -> ()");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mtlfast CUDA kernels";
  m.def("build_info", &build_info, "The CUDA arch list, CUDA runtime and torch versions this build targets");
}
