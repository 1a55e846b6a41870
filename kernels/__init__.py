"""Hot-path kernels: PyTorch references for every device; Triton versions for GPUs (imported only there) sit
beside their reference, with a GPU test comparing the two."""
