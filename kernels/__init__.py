"""saetron.kernels: Triton kernels, their launchers and autograd Functions, and the torch references."""
