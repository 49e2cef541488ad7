// deepopt's multi-tensor apply (CUDA): one launch walks a table of tensors, chunk by chunk.
//
// Table (one int64 device tensor per launch, built on the host, copied from pinned memory):
//   [ pointers (lists x n) | sizes (n) | aligned (n) | modes (n) | chunk -> tensor (C) | chunk -> start (C) ]
// Block b handles chunk b (kChunk elements of one tensor). Each thread moves kVec elements at a
// time: 16-byte loads for the fp32 lists (8 bytes for bf16/fp16 params) when every pointer of the
// tensor is 16-byte aligned, a scalar loop otherwise and for the tail. That loop is written once,
// here; a rule is a functor (see multi_tensor_kernels.cu):
//
//   struct Rule {
//     bool skip() const;                                   // found_inf: no store at all
//     __device__ Element at(const View&, int64_t t) const; // per-tensor values (bias corrections)
//   };
//   Element::operator()(float& p, float (&x)[kLists - 1])  // one element: x[0] = grad, x[1..] = state
//
// List 0 holds the params (type P: fp32, bf16 or fp16); lists 1 .. kLists-1 are fp32 (grad, then
// state). Lists after kLists (e.g. Adam's step scalars) are read by the functor through the View.
#pragma once
#include <torch/extension.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <vector>

namespace deepopt {

constexpr int kThreads = 256;
constexpr int kVec = 4;
constexpr int64_t kChunk = kThreads * kVec * 4;   // 4096 elements

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

struct View {
  int64_t n;        // tensors in this launch
  int64_t chunks;   // chunks in this launch
  int lists;
  const int64_t* tab;
  __device__ __forceinline__ int64_t ptr(int list, int64_t t) const { return tab[list * n + t]; }
  __device__ __forceinline__ int64_t size(int64_t t) const { return tab[lists * n + t]; }
  __device__ __forceinline__ bool aligned(int64_t t) const { return tab[(lists + 1) * n + t] != 0; }
  __device__ __forceinline__ int64_t mode(int64_t t) const { return tab[(lists + 2) * n + t]; }
  __device__ __forceinline__ int64_t tensor_of(int64_t c) const { return tab[(lists + 3) * n + c]; }
  __device__ __forceinline__ int64_t start_of(int64_t c) const { return tab[(lists + 3) * n + chunks + c]; }
};

// torch's lerp: a + w (b - a) for |w| < 0.5, else b - (b - a)(1 - w)
__device__ __forceinline__ float lerp(float a, float b, float w) {
  return fabsf(w) < 0.5f ? a + w * (b - a) : b - (b - a) * (1.0f - w);
}

template <int kLists, typename P, typename Rule>
__global__ void multi_tensor_apply_kernel(View view, Rule rule) {
  if (rule.skip()) return;
  const int64_t c = blockIdx.x;
  const int64_t t = view.tensor_of(c);
  const auto op = rule.at(view, t);
  P* p = reinterpret_cast<P*>(view.ptr(0, t));
  float* x[kLists - 1];
#pragma unroll
  for (int l = 1; l < kLists; ++l) x[l - 1] = reinterpret_cast<float*>(view.ptr(l, t));

  const int64_t start = view.start_of(c);
  const int64_t end = min(start + kChunk, view.size(t));
  int64_t scalar_from = start;
  if (view.aligned(t)) {
    const int64_t vec_end = start + ((end - start) / kVec) * kVec;
    for (int64_t i = start + threadIdx.x * kVec; i < vec_end; i += kThreads * kVec) {
      Vec<P, kVec> pv = *reinterpret_cast<Vec<P, kVec>*>(p + i);
      Vec<float, kVec> xv[kLists - 1];
#pragma unroll
      for (int l = 0; l < kLists - 1; ++l) xv[l] = *reinterpret_cast<Vec<float, kVec>*>(x[l] + i);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        float pf = static_cast<float>(pv.v[k]);
        float e[kLists - 1];
#pragma unroll
        for (int l = 0; l < kLists - 1; ++l) e[l] = xv[l].v[k];
        op(pf, e);
        pv.v[k] = static_cast<P>(pf);
#pragma unroll
        for (int l = 1; l < kLists - 1; ++l) xv[l].v[k] = e[l];
      }
      *reinterpret_cast<Vec<P, kVec>*>(p + i) = pv;
#pragma unroll
      for (int l = 1; l < kLists - 1; ++l) *reinterpret_cast<Vec<float, kVec>*>(x[l] + i) = xv[l];
    }
    scalar_from = vec_end;
  }
  for (int64_t i = scalar_from + threadIdx.x; i < end; i += kThreads) {
    float pf = static_cast<float>(p[i]);
    float e[kLists - 1];
#pragma unroll
    for (int l = 0; l < kLists - 1; ++l) e[l] = x[l][i];
    op(pf, e);
    p[i] = static_cast<P>(pf);
#pragma unroll
    for (int l = 1; l < kLists - 1; ++l) x[l][i] = e[l];
  }
}

// Host: check the lists, build the table, copy it to the device (pinned, non-blocking). Lists
// 1 .. elementwise-1 must be fp32; lists from `elementwise` on are per-tensor scalars.
inline View make_view(const std::vector<const std::vector<at::Tensor>*>& lists, int elementwise,
                      const std::vector<int64_t>& modes, at::Tensor& holder) {
  const auto& params = *lists[0];
  const int64_t n = static_cast<int64_t>(params.size());
  const auto device = params[0].device();
  std::vector<int64_t> host;
  host.reserve(lists.size() * n + 3 * n);
  for (size_t l = 0; l < lists.size(); ++l) {
    TORCH_CHECK(static_cast<int64_t>(lists[l]->size()) == n, "deepopt fused: tensor lists differ in length");
    for (const auto& x : *lists[l]) {
      TORCH_CHECK(x.device() == device, "deepopt fused: all tensors must be on ", device);
      TORCH_CHECK(x.is_contiguous(), "deepopt fused: tensors must be contiguous");
      if (l > 0) {
        TORCH_CHECK(x.scalar_type() == at::kFloat, "deepopt fused (CUDA): gradients and state must be fp32");
      }
      host.push_back(reinterpret_cast<int64_t>(x.data_ptr()));
    }
  }
  for (int64_t t = 0; t < n; ++t) host.push_back(params[t].numel());
  for (int64_t t = 0; t < n; ++t) {
    bool aligned = true;
    for (int l = 0; l < elementwise; ++l) {
      aligned = aligned && (reinterpret_cast<uintptr_t>((*lists[l])[t].data_ptr()) % 16 == 0);
    }
    host.push_back(aligned ? 1 : 0);
  }
  for (int64_t t = 0; t < n; ++t) host.push_back(modes.empty() ? 0 : modes[t]);
  std::vector<int64_t> tensor_of, start_of;
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t s = 0; s < params[t].numel(); s += kChunk) {
      tensor_of.push_back(t);
      start_of.push_back(s);
    }
  }
  host.insert(host.end(), tensor_of.begin(), tensor_of.end());
  host.insert(host.end(), start_of.begin(), start_of.end());
  auto cpu = torch::from_blob(host.data(), {static_cast<int64_t>(host.size())}, torch::kInt64).pin_memory();
  holder = cpu.to(device, /*non_blocking=*/true);
  return View{n, static_cast<int64_t>(tensor_of.size()), static_cast<int>(lists.size()), holder.data_ptr<int64_t>()};
}

// Launch `rule` over the lists, on params of one dtype (fp32, bf16 or fp16).
template <int kLists, typename Rule>
void multi_tensor_apply(const std::vector<const std::vector<at::Tensor>*>& lists, const std::vector<int64_t>& modes,
                        const Rule& rule) {
  const auto& params = *lists[0];
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  at::Tensor holder;
  const View view = make_view(lists, kLists, modes, holder);
  if (view.chunks == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  switch (params[0].scalar_type()) {
    case at::kFloat:
      multi_tensor_apply_kernel<kLists, float><<<view.chunks, kThreads, 0, stream>>>(view, rule);
      break;
    case at::kBFloat16:
      multi_tensor_apply_kernel<kLists, c10::BFloat16><<<view.chunks, kThreads, 0, stream>>>(view, rule);
      break;
    case at::kHalf:
      multi_tensor_apply_kernel<kLists, c10::Half><<<view.chunks, kThreads, 0, stream>>>(view, rule);
      break;
    default:
      TORCH_CHECK(false, "deepopt fused (CUDA): params must be fp32, bf16 or fp16");
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace deepopt
