// deepopt's fused updates for AssociativeMomentum (CUDA): one functor per rule, launched by
// multi_tensor_apply.cuh. All arithmetic is fp32 as torch's (Adam's bias corrections in fp64, as
// torch computes them on the host); params may be fp32/bf16/fp16, state and gradients are fp32.
// found_inf != 0: the kernel returns before any store. A tensor lr is read on the device.
#include "multi_tensor.h"
#include "multi_tensor_apply.cuh"

#include <cmath>

namespace deepopt {
namespace {

// What every rule shares: lr (or its device scalar), GradScaler's scale / found_inf, and the
// gradient pre-processing (unscale, maximize, coupled weight decay), as deepopt/functional.py.
struct Common {
  float lr, wd, decay;
  const float* lr_ptr;
  const float* scale_ptr;
  const float* inf_ptr;
  bool decoupled, maximize;

  __device__ __forceinline__ bool skip() const { return inf_ptr != nullptr && *inf_ptr != 0.0f; }
  __device__ __forceinline__ float step_lr() const { return lr_ptr ? *lr_ptr : lr; }
  __device__ __forceinline__ float preprocess(float g, float p) const {
    if (scale_ptr) g = g / *scale_ptr;
    if (maximize) g = -g;
    if (!decoupled && wd != 0.0f) g = g + wd * p;
    return g;
  }
};

// AssociativeMomentum, SGD value map (torch.optim.SGD): lists p, g[, momentum_buffer].
struct Sgd {
  Common c;
  float momentum, write_rate;
  bool nesterov;

  struct Element {
    Common c;
    float lr, decay, momentum, write_rate;
    bool first, nesterov;
    template <int N>
    __device__ __forceinline__ void operator()(float& p, float (&x)[N]) const {
      const float g = c.preprocess(x[0], p);
      float u = g;
      if constexpr (N > 1) {   // with momentum: x[1] is the memory
        const float m = first ? g : x[1] * momentum + write_rate * g;
        x[1] = m;
        u = nesterov ? g + momentum * m : m;
      }
      if (c.decoupled && c.wd != 0.0f) p = p * decay;
      p = p + (-lr) * u;
    }
  };

  __device__ __forceinline__ bool skip() const { return c.skip(); }
  __device__ __forceinline__ Element at(const View& view, int64_t t) const {
    const float lr = c.step_lr();
    return Element{c, lr, c.lr_ptr ? 1.0f - lr * c.wd : c.decay, momentum, write_rate, view.mode(t) == 1, nesterov};
  }
};

// AssociativeMomentum, Adam value map (torch.optim.Adam / AdamW): lists p, g, exp_avg, exp_avg_sq,
// then step (per-tensor fp32 scalars, already incremented by the caller).
struct Adam {
  Common c;
  float w1, eps;
  double beta1, beta2;

  struct Element {
    Common c;
    float lr, decay, w1, beta2, w2, eps, step_size, bc2_sqrt;
    template <int N>
    __device__ __forceinline__ void operator()(float& p, float (&x)[N]) const {
      static_assert(N == 3, "Adam: lists p, g, exp_avg, exp_avg_sq");
      const float g = c.preprocess(x[0], p);
      if (c.decoupled && c.wd != 0.0f) p = p * decay;
      x[1] = lerp(x[1], g, w1);
      x[2] = x[2] * beta2 + w2 * (g * g);
      const float denom = sqrtf(x[2]) / bc2_sqrt + eps;
      p = p + (-step_size) * (x[1] / denom);
    }
  };

  __device__ __forceinline__ bool skip() const { return c.skip(); }
  __device__ __forceinline__ Element at(const View& view, int64_t t) const {
    const double step = static_cast<double>(*reinterpret_cast<const float*>(view.ptr(4, t)));
    const float lr = c.step_lr();
    const double bc1 = 1.0 - pow(beta1, step);
    const double bc2 = 1.0 - pow(beta2, step);
    return Element{c, lr, 1.0f - lr * c.wd, w1, static_cast<float>(beta2), static_cast<float>(1.0 - beta2), eps,
                   static_cast<float>(static_cast<double>(lr) / bc1), static_cast<float>(sqrt(bc2))};
  }
};

const float* opt_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

Common common(double lr, const c10::optional<at::Tensor>& lr_tensor, double weight_decay, bool decoupled,
              bool maximize, const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf) {
  return Common{static_cast<float>(lr), static_cast<float>(weight_decay), static_cast<float>(1.0 - lr * weight_decay),
                opt_ptr(lr_tensor), opt_ptr(grad_scale), opt_ptr(found_inf), decoupled, maximize};
}

}  // namespace

void sgd_update(std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> bufs,
                std::vector<int64_t> first, double lr, c10::optional<at::Tensor> lr_tensor, double momentum,
                double dampening, double weight_decay, bool decoupled, bool nesterov, bool maximize,
                c10::optional<at::Tensor> grad_scale, c10::optional<at::Tensor> found_inf) {
  const Sgd rule{common(lr, lr_tensor, weight_decay, decoupled, maximize, grad_scale, found_inf),
                 static_cast<float>(momentum), static_cast<float>(1.0 - dampening), nesterov};
  if (momentum != 0.0) {
    multi_tensor_apply<3>({&params, &grads, &bufs}, first, rule);
  } else {
    multi_tensor_apply<2>({&params, &grads}, {}, rule);
  }
}

void adam_update(std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> exp_avgs,
                 std::vector<at::Tensor> exp_avg_sqs, std::vector<at::Tensor> steps, double lr,
                 c10::optional<at::Tensor> lr_tensor, double beta1, double beta2, double eps, double weight_decay,
                 bool decoupled, bool maximize, c10::optional<at::Tensor> grad_scale,
                 c10::optional<at::Tensor> found_inf) {
  const Adam rule{common(lr, lr_tensor, weight_decay, decoupled, maximize, grad_scale, found_inf),
                  static_cast<float>(1.0 - beta1), static_cast<float>(eps), beta1, beta2};
  multi_tensor_apply<4>({&params, &grads, &exp_avgs, &exp_avg_sqs, &steps}, {}, rule);
}

}  // namespace deepopt
