// main_grad (fp32) += grad (fp32, fp16 or bf16): the fp32 weight-gradient accumulation
// step of Megatron-style main_grad buffers, as one elementwise kernel.
// Only c10 CUDA headers: ATen/cuda/CUDAContext.h pulls in cuSPARSE/cuBLAS headers that a
// minimal toolkit may lack.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace mtlfast {
namespace {

template <typename scalar_t>
__global__ void accumulate_fp32_kernel(float* __restrict__ main_grad, const scalar_t* __restrict__ grad, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    main_grad[i] += static_cast<float>(grad[i]);
  }
}

}  // namespace

void accumulate_fp32_cuda(at::Tensor& main_grad, const at::Tensor& grad) {
  TORCH_CHECK(main_grad.is_cuda() && grad.is_cuda(), "accumulate_fp32_: both tensors must be CUDA tensors");
  TORCH_CHECK(main_grad.scalar_type() == at::kFloat, "accumulate_fp32_: main_grad must be float32, got ",
              main_grad.scalar_type());
  TORCH_CHECK(main_grad.sizes() == grad.sizes(), "accumulate_fp32_: shape mismatch ", main_grad.sizes(), " vs ",
              grad.sizes());
  TORCH_CHECK(main_grad.is_contiguous() && grad.is_contiguous(), "accumulate_fp32_: tensors must be contiguous");
  TORCH_CHECK(main_grad.device() == grad.device(), "accumulate_fp32_: tensors on different devices");
  const int64_t n = main_grad.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(main_grad.device());
  const int threads = 256;
  const int64_t wanted = (n + threads - 1) / threads;
  const int blocks = static_cast<int>(std::min<int64_t>(wanted, 65535));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "accumulate_fp32_", [&] {
    accumulate_fp32_kernel<scalar_t>
        <<<blocks, threads, 0, stream>>>(main_grad.data_ptr<float>(), grad.data_ptr<scalar_t>(), n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

TORCH_LIBRARY_IMPL(mtlfast_C, CUDA, m) { m.impl("accumulate_fp32_", &accumulate_fp32_cuda); }

}  // namespace mtlfast
