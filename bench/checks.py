"""The benchmark's one check policy: how far an output may be from the function it claims
to compute, and the check itself. Everything in ``bench/`` that compares outputs uses it.

- :func:`check_output`: a provider's (or a kernel's) output against the fp32 reference
  of the function it computes, by the relative error ``max|y − ref| / max|ref|`` and the
  per-dtype :func:`tolerance`. A failure's status starts with :data:`WRONG_OUTPUT`, so a
  fast wrong answer is reported as an error, never as a speedup.
- :func:`compare_predictions` / :func:`converted_ok`: the demo's check that a converted
  module computes the masked network (fp32 on both sides: same predictions, and at most
  :data:`CONVERTED_MAX_ABS_DIFF` apart).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

WRONG_OUTPUT = "wrong output"  # the status prefix of an output over its tolerance
# The demo's converted module against the masked network, both fp32 on the CPU.
CONVERTED_MAX_ABS_DIFF = 1e-3


@functools.cache
def tolerance(dtype: torch.dtype) -> float:
    """Largest accepted max|y − ref| / max|ref| against the fp32 reference."""
    # tf32 convs (cuDNN's default) and fp16/bf16 storage bound the error; the relative
    # measure keeps deep networks with large activations comparable to single layers.
    return {torch.float32: 5e-3, torch.float16: 2e-2, torch.bfloat16: 8e-2}[dtype]


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max|y − ref| / max|ref|, both in fp32."""
    y, ref = y.float(), ref.float()
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def check_output(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
    """``{"rel_error", "status"}``: status ``"ok"`` within :func:`tolerance` of ``dtype``,
    else a :data:`WRONG_OUTPUT` message with the error and the tolerance."""
    error = relative_error(y, ref)
    if error <= tolerance(dtype):
        return {"rel_error": error, "status": "ok"}
    return {
        "rel_error": error,
        "status": f"{WRONG_OUTPUT}: max|y-ref|/max|ref| = {error:.2e} > {tolerance(dtype):.0e}",
    }


def is_wrong(row: dict[str, Any]) -> bool:
    """Whether a result row's output failed its check (not an error, not a timing)."""
    return row["status"].startswith(WRONG_OUTPUT)


def compare_predictions(y: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor) -> dict:
    """A converted module's logits ``y`` against the masked network's ``ref`` on a test
    set with ``labels``: max |Δ|, same predictions, both accuracies (percent)."""
    return {
        "max_abs_diff": float((y - ref).abs().max()),
        "same_predictions": bool((y.argmax(1) == ref.argmax(1)).all()),
        "accuracy_masked": 100.0 * float((ref.argmax(1) == labels).float().mean()),
        "accuracy_converted": 100.0 * float((y.argmax(1) == labels).float().mean()),
    }


def converted_ok(check: dict[str, Any]) -> bool:
    """The verdict on :func:`compare_predictions`' result."""
    return check["same_predictions"] and check["max_abs_diff"] < CONVERTED_MAX_ABS_DIFF
