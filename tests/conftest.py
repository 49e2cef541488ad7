import os

import torch
from hypothesis import HealthCheck, settings

# "ci": few examples, no deadline (CPU timing noise); "dev": more examples for local runs.
settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# tiny tensors: threads only add contention on the 2-core CI box
torch.set_num_threads(1)
if not torch.cuda.is_available():
    # the fused Triton kernels run in Triton's interpreter on CPU; set before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")
