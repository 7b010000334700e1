"""The SIREN reference notebook's layer, written out in plain PyTorch for the tests
(independent of nfd_fast: it is what existing user code looks like)."""
import math

import torch
from torch import nn


class NotebookSineLayer(nn.Module):
    def __init__(self, in_f, out_f, is_first=False, omega_0=30.0):
        super().__init__()
        self.omega_0 = omega_0
        self.linear = nn.Linear(in_f, out_f)
        bound = 1 / in_f if is_first else math.sqrt(6 / in_f) / omega_0
        with torch.no_grad():
            self.linear.weight.uniform_(-bound, bound)

    def forward(self, x):
        return torch.sin(self.omega_0 * self.linear(x))
