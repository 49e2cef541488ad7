// deepopt's fused multi-tensor updates (CUDA): the entry points bindings.cpp exports.
#pragma once
#include <torch/extension.h>

#include <vector>

namespace deepopt {

// p <- SGD-convention momentum update (AssociativeMomentum, preconditioner=None), fp32 state.
void sgd_update(std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
                std::vector<at::Tensor> bufs, std::vector<int64_t> first, double lr,
                c10::optional<at::Tensor> lr_tensor, double momentum, double dampening,
                double weight_decay, bool decoupled, bool nesterov, bool maximize,
                c10::optional<at::Tensor> grad_scale, c10::optional<at::Tensor> found_inf);

// p <- Adam / AdamW update (preconditioner="adam"), op for op as torch's Adam; steps are
// fp32 device scalars already incremented by the caller.
void adam_update(std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
                 std::vector<at::Tensor> exp_avgs, std::vector<at::Tensor> exp_avg_sqs,
                 std::vector<at::Tensor> steps, double lr, c10::optional<at::Tensor> lr_tensor,
                 double beta1, double beta2, double eps, double weight_decay, bool decoupled,
                 bool maximize, c10::optional<at::Tensor> grad_scale,
                 c10::optional<at::Tensor> found_inf);

}  // namespace deepopt
