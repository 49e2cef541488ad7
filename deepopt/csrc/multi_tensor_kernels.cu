// deepopt fused multi-tensor updates for AssociativeMomentum (CUDA).
//
// Table (one int64 device tensor per launch, built on the host, copied from pinned memory):
//   [ pointers (lists x n) | sizes (n) | aligned (n) | modes (n) | chunk -> tensor (C) | chunk -> start (C) ]
// Block b updates chunk b (kChunk elements of one tensor). All arithmetic is fp32 as torch's
// (Adam's bias corrections in fp64 as torch computes them on the host); params may be
// fp32/bf16/fp16, state and gradients are fp32. found_inf != 0: the kernel returns before any
// store. A tensor lr is read on the device (no host sync).
#include "multi_tensor.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>

namespace deepopt {
namespace {

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

struct SgdArgs {
  float lr, momentum, write_rate, wd, decay;
  const float* lr_ptr;
  const float* scale_ptr;
  const float* inf_ptr;
  bool decoupled, nesterov, maximize, has_momentum;
};

struct AdamArgs {
  float lr, w1, eps, wd;
  double beta1, beta2;
  const float* lr_ptr;
  const float* scale_ptr;
  const float* inf_ptr;
  bool decoupled, maximize;
};

// torch's lerp: a + w (b - a) for |w| < 0.5, else b - (b - a)(1 - w)
__device__ __forceinline__ float lerp(float a, float b, float w) {
  return fabsf(w) < 0.5f ? a + w * (b - a) : b - (b - a) * (1.0f - w);
}

template <typename P>
__global__ void sgd_kernel(View view, SgdArgs a) {
  if (a.inf_ptr != nullptr && *a.inf_ptr != 0.0f) return;
  const int64_t c = blockIdx.x;
  const int64_t t = view.tensor_of(c);
  P* p = reinterpret_cast<P*>(view.ptr(0, t));
  const float* g = reinterpret_cast<const float*>(view.ptr(1, t));
  float* b = reinterpret_cast<float*>(view.ptr(2, t));
  const bool first = view.mode(t) == 1;
  const float lr = a.lr_ptr ? *a.lr_ptr : a.lr;
  const float decay = a.lr_ptr ? 1.0f - lr * a.wd : a.decay;
  const float scale = a.scale_ptr ? *a.scale_ptr : 1.0f;

  auto update = [&](float& pv, float gv, float& bv) {
    if (a.scale_ptr) gv = gv / scale;
    if (a.maximize) gv = -gv;
    if (!a.decoupled && a.wd != 0.0f) gv = gv + a.wd * pv;
    float u = gv;
    if (a.has_momentum) {
      const float nb = first ? gv : bv * a.momentum + a.write_rate * gv;
      bv = nb;
      u = a.nesterov ? gv + a.momentum * nb : nb;
    }
    if (a.decoupled && a.wd != 0.0f) pv = pv * decay;
    pv = pv + (-lr) * u;
  };
  auto vec_op = [&](int64_t i) {
    Vec<P, kVec> pv = *reinterpret_cast<Vec<P, kVec>*>(p + i);
    Vec<float, kVec> gv = *reinterpret_cast<const Vec<float, kVec>*>(g + i);
    Vec<float, kVec> bv;
    if (a.has_momentum) bv = *reinterpret_cast<Vec<float, kVec>*>(b + i);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      float pf = static_cast<float>(pv.v[k]);
      float bf = a.has_momentum ? bv.v[k] : 0.0f;
      update(pf, gv.v[k], bf);
      pv.v[k] = static_cast<P>(pf);
      bv.v[k] = bf;
    }
    *reinterpret_cast<Vec<P, kVec>*>(p + i) = pv;
    if (a.has_momentum) *reinterpret_cast<Vec<float, kVec>*>(b + i) = bv;
  };
  auto scalar_op = [&](int64_t i) {
    float pf = static_cast<float>(p[i]);
    float bf = a.has_momentum ? b[i] : 0.0f;
    update(pf, g[i], bf);
    p[i] = static_cast<P>(pf);
    if (a.has_momentum) b[i] = bf;
  };
  const int64_t start = view.start_of(c);
  const int64_t end = min(start + kChunk, view.size(t));
  int64_t scalar_from = start;
  if (view.aligned(t)) {
    const int64_t vec_end = start + ((end - start) / kVec) * kVec;
    for (int64_t i = start + threadIdx.x * kVec; i < vec_end; i += kThreads * kVec) vec_op(i);
    scalar_from = vec_end;
  }
  for (int64_t i = scalar_from + threadIdx.x; i < end; i += kThreads) scalar_op(i);
}

template <typename P>
__global__ void adam_kernel(View view, AdamArgs a) {
  if (a.inf_ptr != nullptr && *a.inf_ptr != 0.0f) return;
  const int64_t c = blockIdx.x;
  const int64_t t = view.tensor_of(c);
  P* p = reinterpret_cast<P*>(view.ptr(0, t));
  const float* g = reinterpret_cast<const float*>(view.ptr(1, t));
  float* m = reinterpret_cast<float*>(view.ptr(2, t));
  float* v = reinterpret_cast<float*>(view.ptr(3, t));
  const double step = static_cast<double>(*reinterpret_cast<const float*>(view.ptr(4, t)));
  const float lr = a.lr_ptr ? *a.lr_ptr : a.lr;
  const double bc1 = 1.0 - pow(a.beta1, step);
  const double bc2 = 1.0 - pow(a.beta2, step);
  const float step_size = static_cast<float>(static_cast<double>(lr) / bc1);
  const float bc2_sqrt = static_cast<float>(sqrt(bc2));
  const float beta2 = static_cast<float>(a.beta2);
  const float w2 = static_cast<float>(1.0 - a.beta2);
  const float decay = 1.0f - lr * a.wd;
  const float scale = a.scale_ptr ? *a.scale_ptr : 1.0f;

  auto update = [&](float& pv, float gv, float& mv, float& vv) {
    if (a.scale_ptr) gv = gv / scale;
    if (a.maximize) gv = -gv;
    if (!a.decoupled && a.wd != 0.0f) gv = gv + a.wd * pv;
    if (a.decoupled && a.wd != 0.0f) pv = pv * decay;
    mv = lerp(mv, gv, a.w1);
    vv = vv * beta2 + w2 * (gv * gv);
    const float denom = sqrtf(vv) / bc2_sqrt + a.eps;
    pv = pv + (-step_size) * (mv / denom);
  };
  auto vec_op = [&](int64_t i) {
    Vec<P, kVec> pv = *reinterpret_cast<Vec<P, kVec>*>(p + i);
    Vec<float, kVec> gv = *reinterpret_cast<const Vec<float, kVec>*>(g + i);
    Vec<float, kVec> mv = *reinterpret_cast<Vec<float, kVec>*>(m + i);
    Vec<float, kVec> vv = *reinterpret_cast<Vec<float, kVec>*>(v + i);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      float pf = static_cast<float>(pv.v[k]);
      update(pf, gv.v[k], mv.v[k], vv.v[k]);
      pv.v[k] = static_cast<P>(pf);
    }
    *reinterpret_cast<Vec<P, kVec>*>(p + i) = pv;
    *reinterpret_cast<Vec<float, kVec>*>(m + i) = mv;
    *reinterpret_cast<Vec<float, kVec>*>(v + i) = vv;
  };
  auto scalar_op = [&](int64_t i) {
    float pf = static_cast<float>(p[i]);
    float mf = m[i], vf = v[i];
    update(pf, g[i], mf, vf);
    p[i] = static_cast<P>(pf);
    m[i] = mf;
    v[i] = vf;
  };
  const int64_t start = view.start_of(c);
  const int64_t end = min(start + kChunk, view.size(t));
  int64_t scalar_from = start;
  if (view.aligned(t)) {
    const int64_t vec_end = start + ((end - start) / kVec) * kVec;
    for (int64_t i = start + threadIdx.x * kVec; i < vec_end; i += kThreads * kVec) vec_op(i);
    scalar_from = vec_end;
  }
  for (int64_t i = scalar_from + threadIdx.x; i < end; i += kThreads) scalar_op(i);
}

// Host: check the lists, build the table, copy it to the device (pinned, non-blocking).
View make_view(const std::vector<const std::vector<at::Tensor>*>& lists, const std::vector<int64_t>& modes,
               at::Tensor& holder) {
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
      if (l > 0 && x.dim() > 0) {
        TORCH_CHECK(x.scalar_type() == at::kFloat, "deepopt fused (CUDA): gradients and state must be fp32");
      }
      host.push_back(reinterpret_cast<int64_t>(x.data_ptr()));
    }
  }
  std::vector<int64_t> tensor_of, start_of;
  for (int64_t t = 0; t < n; ++t) host.push_back(params[t].numel());
  for (int64_t t = 0; t < n; ++t) {
    bool aligned = true;
    for (size_t l = 0; l < lists.size(); ++l) {
      if ((*lists[l])[t].dim() == 0 && l == 4) continue;   // Adam's step scalar
      aligned = aligned && (reinterpret_cast<uintptr_t>((*lists[l])[t].data_ptr()) % 16 == 0);
    }
    host.push_back(aligned ? 1 : 0);
  }
  for (int64_t t = 0; t < n; ++t) host.push_back(modes.empty() ? 0 : modes[t]);
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

const float* opt_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

}  // namespace

void sgd_update(std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> bufs,
                std::vector<int64_t> first, double lr, c10::optional<at::Tensor> lr_tensor, double momentum,
                double dampening, double weight_decay, bool decoupled, bool nesterov, bool maximize,
                c10::optional<at::Tensor> grad_scale, c10::optional<at::Tensor> found_inf) {
  if (params.empty()) return;
  const bool has_momentum = momentum != 0.0;
  if (!has_momentum) bufs = params;   // unused pointers
  const c10::cuda::CUDAGuard guard(params[0].device());
  at::Tensor holder;
  View view = make_view({&params, &grads, &bufs}, first, holder);
  if (view.chunks == 0) return;
  SgdArgs a{static_cast<float>(lr), static_cast<float>(momentum), static_cast<float>(1.0 - dampening),
            static_cast<float>(weight_decay), static_cast<float>(1.0 - lr * weight_decay),
            opt_ptr(lr_tensor), opt_ptr(grad_scale), opt_ptr(found_inf), decoupled, nesterov, maximize,
            has_momentum};
  auto stream = at::cuda::getCurrentCUDAStream();
  switch (params[0].scalar_type()) {
    case at::kFloat: sgd_kernel<float><<<view.chunks, kThreads, 0, stream>>>(view, a); break;
    case at::kBFloat16: sgd_kernel<c10::BFloat16><<<view.chunks, kThreads, 0, stream>>>(view, a); break;
    case at::kHalf: sgd_kernel<c10::Half><<<view.chunks, kThreads, 0, stream>>>(view, a); break;
    default: TORCH_CHECK(false, "deepopt fused (CUDA): params must be fp32, bf16 or fp16");
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void adam_update(std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> exp_avgs,
                 std::vector<at::Tensor> exp_avg_sqs, std::vector<at::Tensor> steps, double lr,
                 c10::optional<at::Tensor> lr_tensor, double beta1, double beta2, double eps, double weight_decay,
                 bool decoupled, bool maximize, c10::optional<at::Tensor> grad_scale,
                 c10::optional<at::Tensor> found_inf) {
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  at::Tensor holder;
  View view = make_view({&params, &grads, &exp_avgs, &exp_avg_sqs, &steps}, {}, holder);
  if (view.chunks == 0) return;
  AdamArgs a{static_cast<float>(lr), static_cast<float>(1.0 - beta1), static_cast<float>(eps),
             static_cast<float>(weight_decay), beta1, beta2, opt_ptr(lr_tensor), opt_ptr(grad_scale),
             opt_ptr(found_inf), decoupled, maximize};
  auto stream = at::cuda::getCurrentCUDAStream();
  switch (params[0].scalar_type()) {
    case at::kFloat: adam_kernel<float><<<view.chunks, kThreads, 0, stream>>>(view, a); break;
    case at::kBFloat16: adam_kernel<c10::BFloat16><<<view.chunks, kThreads, 0, stream>>>(view, a); break;
    case at::kHalf: adam_kernel<c10::Half><<<view.chunks, kThreads, 0, stream>>>(view, a); break;
    default: TORCH_CHECK(false, "deepopt fused (CUDA): params must be fp32, bf16 or fp16");
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace deepopt
