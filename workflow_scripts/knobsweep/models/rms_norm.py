"""RMSNorm in one Triton kernel, for the fast paths' graphed prefill and decode steps.

transformers' Qwen3 RMSNorm runs as ~7 kernels (to float32, square, mean, add epsilon, rsqrt, multiply, round,
times the weight), each a pass over a (tokens x hidden) tensor: ~4 ms of an H100's 1898-token prefill of the
real model. Here one program normalises one row, rounding where transformers does: the normalised row is
rounded to the input's dtype, then multiplied by the weight in float32 and rounded to the result's dtype
(torch's type promotion of weight and input). The fast paths use it in decode steps too (`fast_path.FusedModules`):
one launch per norm, like the compiled norm it replaced, without compiling anything.
"""

from __future__ import annotations

import torch

from knobsweep.models import pdl
from knobsweep.models.pdl import wait_for_previous_kernel

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs may lack Triton
    triton = None

# transformers classes whose forward is exactly `weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`
RMS_NORM_CLASSES = ("Qwen3VLMoeTextRMSNorm", "Qwen3MoeRMSNorm")

if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, N, eps, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        wait_for_previous_kernel(PDL)
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < N
        x = tl.load(x_ptr + row * N + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
        normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * N + offs, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm over the last dimension of x with `weight`, in `_rms_norm_kernel`."""
    n = x.shape[-1]
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    launch_pdl = pdl.use(x)
    _rms_norm_kernel[(x.numel() // n,)](
        x,
        weight,
        out,
        n,
        eps,
        BLOCK=triton.next_power_of_2(n),
        PDL=launch_pdl,
        launch_pdl=launch_pdl,
        num_warps=4,
    )
    return out


def fusable_norm(module: torch.nn.Module) -> bool:
    return type(module).__name__ in RMS_NORM_CLASSES and hasattr(module, "variance_epsilon")


def rms_norm_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """An RMSNorm module's forward in one kernel where Triton runs (set on the instance by the fast paths around
    decode steps and the graphed prefill); the class's forward otherwise."""
    from knobsweep.models.fused_moe import triton_usable

    if not triton_usable(hidden_states) or self.weight.shape[-1] != hidden_states.shape[-1]:
        return type(self).forward(self, hidden_states)
    return rms_norm(hidden_states, self.weight, float(self.variance_epsilon))
