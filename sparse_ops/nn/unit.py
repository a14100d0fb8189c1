"""The plumbing every inference unit shares: optional buffers, a JSON config, the state a
converted file stores, and when a call may skip the custom-op dispatcher."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

# The units' config version in a converted file (the packed formats carry their own).
UNIT_CONFIG_VERSION = 1


def memory_format(x: Tensor) -> torch.memory_format:
    # Both the kernels and the CPU paths produce channels-last outputs.
    return torch.channels_last


def plain_eager_call(*tensors: Tensor | None) -> bool:
    """True when nothing traces or intercepts this call: no torch.compile / export /
    jit trace, no tensor subclass (fake, functional, proxy), no dispatch or function mode,
    no gradient wanted. Then a unit calls its op's implementation directly, skipping the
    dispatcher's custom-op machinery (about half the host time of an eager conv call);
    whenever anything might be recording, it calls the registered op, so graphs always
    see one opaque op per layer."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) is not Tensor or (grad and t.requires_grad) or _functorch_wrapped(t):
            return False
    # A kept plan built during CUDA-graph capture would hold copies the capture only
    # records (never runs) until the first replay: capture goes through the op.
    return not (tensors[0].is_cuda and torch.cuda.is_current_stream_capturing())


def _functorch_wrapped(t: Tensor) -> bool:
    """A vmap/grad transform's wrapper: a plain Tensor by type, not by behaviour."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


def fp32(t: Tensor | None) -> Tensor | None:
    """Biases stay fp32 for the kernels even after ``module.half()``."""
    return t if t is None or t.dtype == torch.float32 else t.float()


def version_of(t: Tensor | None) -> int | None:
    """In-place updates seen so far; inference tensors (a module built under
    ``torch.inference_mode``) keep no counter, and change only by replacement."""
    return None if t is None or t.is_inference() else t._version


class Unit(nn.Module):
    """Shared plumbing: buffers that may be None, a JSON config, state for saving."""

    _buffer_names: tuple[str, ...] = ()

    def _set_buffers(self, tensors: dict[str, Tensor | None]) -> None:
        for name in self._buffer_names:
            value = tensors.get(name)
            if value is not None:
                # Canonical strides: a contiguous tensor may carry any stride on a size-1
                # dimension, and CPU conv kernels pick different paths on that, so a module
                # and its saved-and-loaded copy would round differently.
                value = value.detach().clone(memory_format=torch.contiguous_format)
            self.register_buffer(name, value)

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {n: getattr(self, n) for n in self._buffer_names if getattr(self, n) is not None}
        return tensors, dict(
            self.config(), format_version=UNIT_CONFIG_VERSION, tensors=sorted(tensors)
        )

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], config: dict[str, Any]):
        raise NotImplementedError

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError(f"{type(self).__name__} is an inference module (eval only)")
        return super().train(False)
