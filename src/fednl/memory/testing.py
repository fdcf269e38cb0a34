"""Comparison helpers for parity tests of numerical ops (relative RMS error with readable messages)."""

from __future__ import annotations

import torch


def rel_rms_error(ref: torch.Tensor, got: torch.Tensor) -> float:
    """``rms(got - ref) / rms(ref)`` computed in float64; ``rms(got - ref)`` when ``ref`` is all zeros."""
    if ref.shape != got.shape:
        raise ValueError(f"shape mismatch: reference {tuple(ref.shape)} vs got {tuple(got.shape)}")
    ref64, got64 = ref.detach().double(), got.detach().double()
    if ref64.numel() == 0:
        return 0.0
    err = (got64 - ref64).pow(2).mean().sqrt().item()
    denom = ref64.pow(2).mean().sqrt().item()
    return err / denom if denom > 0 else err


def assert_close(name: str, ref: torch.Tensor, got: torch.Tensor, tol: float) -> None:
    """Raise AssertionError naming ``name`` when the relative RMS error exceeds ``tol`` (NaN always fails)."""
    err = rel_rms_error(ref, got)
    if not err <= tol:  # NaN-safe
        ref64, got64 = ref.detach().double(), got.detach().double()
        max_diff = (got64 - ref64).abs().max().item()
        ref_rms = ref64.pow(2).mean().sqrt().item()
        raise AssertionError(
            f"{name}: relative RMS error {err:.3e} > tol {tol:.1e} "
            f"(max abs diff {max_diff:.3e}, reference RMS {ref_rms:.3e}, shape {tuple(ref.shape)})"
        )
