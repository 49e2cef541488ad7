// deepopt fused multi-tensor updates: shared declarations.
//
// One launch walks a table of tensors (device arrays of pointers and sizes) split into chunks of
// kChunk elements; block b handles chunk b. Each thread moves kVec elements at a time: 16-byte
// loads for fp32 state and gradients (8 bytes for bf16/fp16 params) when every pointer of the
// tensor is 16-byte aligned, a scalar loop otherwise and for the tail.
#pragma once
#include <torch/extension.h>

namespace deepopt {

constexpr int kThreads = 256;
constexpr int kVec = 4;
constexpr int64_t kChunk = kThreads * kVec * 4;   // 4096 elements

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
