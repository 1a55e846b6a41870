"""GPU kernels (Triton), each beside a PyTorch reference and a test comparing the two."""
