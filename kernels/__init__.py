"""Triton kernels of nfd_fast (installed as nfd_fast.kernels): @triton.jit code and launch
constants only. The autograd wiring and the PyTorch references live in nfd_fast.ops."""
