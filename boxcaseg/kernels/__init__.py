"""Fast paths for the BoxCaseg losses: Triton kernels, a fused torch path, one dispatcher."""
