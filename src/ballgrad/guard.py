"""Numerics guard (DESIGN.md §2): refuse to run where a setting breaks the rounding model.

Checked once per process on the first BallTensor op (and on demand with ``check_numerics()``):
- flush-to-zero / denormals-are-zero on any intra-op thread (a large subnormal tensor probed in parallel);
- mkldnn float32 matmul precision other than "ieee" (bf16/tf32 GEMMs on CPU);
- on CUDA: TF32 or reduced-precision reductions in matmul/conv.
Each failure names the fix.
"""

from __future__ import annotations

import torch

from ballgrad.errors import NumericsGuardError

_checked: set[str] = set()


def check_once(device_type: str = "cpu") -> None:
    """Run the checks for ``device_type`` the first time it is seen (a set lookup afterwards)."""
    if device_type not in _checked:
        check_numerics(cuda=device_type == "cuda")
        _checked.add(device_type)


def reset() -> None:
    """Forget that the checks passed (tests flip settings and re-check)."""
    _checked.clear()


def _probe_subnormals(dtype: torch.dtype) -> None:
    tiny = torch.finfo(dtype).smallest_normal
    # 2^18 elements per thread-chunk-sized piece so that every intra-op thread gets work.
    n = max(1 << 18, 65536 * torch.get_num_threads())
    x = torch.full((n,), tiny, dtype=dtype)
    halves = x * 0.5  # exact subnormal results: flushed to 0 under FTZ
    if not bool((halves > 0).all()):
        raise NumericsGuardError(
            f"flush-to-zero is on ({dtype} subnormal results become 0), which breaks ballgrad's rounding model. "
            "Fix: torch.set_flush_denormal(False) before any parallel work (intra-op threads inherit the flag from "
            "the thread that created them, so a process that ran parallel ops with it on must be restarted), and "
            "avoid libraries built with -ffast-math that set FTZ/DAZ."
        )
    back = halves * 2.0  # subnormal inputs read as 0 under DAZ
    if not bool((back == x).all()):
        raise NumericsGuardError(
            f"denormals-are-zero is on ({dtype} subnormal inputs read as 0). Fix: torch.set_flush_denormal(False)."
        )


def check_numerics(cuda: bool = False) -> None:
    """Run the checks now (the CUDA ones with ``cuda=True``); raise NumericsGuardError naming the fix."""
    for dtype in (torch.float32, torch.float64):
        _probe_subnormals(dtype)
    matmul_precision = _float32_matmul_precision()
    if matmul_precision not in (None, "highest"):
        raise NumericsGuardError(
            f"torch.get_float32_matmul_precision() is {matmul_precision!r}: float32 matmuls may "
            "use TF32/bf16. Fix: torch.set_float32_matmul_precision('highest')."
        )
    precision = _mkldnn_matmul_precision()
    if precision not in (None, "ieee", "none"):
        raise NumericsGuardError(
            f"torch.backends.mkldnn.matmul.fp32_precision is {precision!r}: float32 GEMMs may run in reduced precision. "
            "Fix: torch.backends.mkldnn.matmul.fp32_precision = 'ieee'."
        )
    if cuda:
        if torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32:
            raise NumericsGuardError(
                "TF32 is enabled for CUDA matmul/cuDNN. Fix: torch.backends.cuda.matmul.allow_tf32 = False and "
                "torch.backends.cudnn.allow_tf32 = False."
            )
        if torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction or (
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
        ):
            raise NumericsGuardError(
                "reduced-precision reductions are enabled for CUDA half/bfloat16 matmul. Fix: set "
                "torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False (and the bf16 flag)."
            )


def _float32_matmul_precision():
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:  # legacy and new precision APIs mixed: the backend-specific checks below decide
        return None


def _mkldnn_matmul_precision():
    try:
        return torch.backends.mkldnn.matmul.fp32_precision
    except AttributeError:
        return None


_bf16_gemm_verdict: bool | None = None


def bf16_gemm_accumulates_in_float32() -> bool:
    """Whether this machine's CPU bfloat16 GEMMs (mm, addmm, bmm, mv) are fast and accumulate in float32 (linalg's
    Lemma B assumes it).

    Needs AMX or AVX512-BF16 (elsewhere bf16 GEMMs are emulated and slower than float32: radius GEMMs then stay in
    float32). The probe: rows [1, 2^-9, ..., 2^-9] (k - 1 copies of 2^-9) times ones, for several shapes that reach
    different kernels (short and long k, narrow and wide outputs); float32 accumulation gives 1 + (k - 1) 2^-9,
    bfloat16 accumulation (ulp(1) = 2^-7) keeps 1. Exactness is not required (the result is rounded to bfloat16), only
    that it stays within 2% of the float32 sum. Computed once per process.
    """
    global _bf16_gemm_verdict
    if _bf16_gemm_verdict is None:
        _bf16_gemm_verdict = _probe_bf16_gemm()
    return _bf16_gemm_verdict


def _probe_bf16_gemm() -> bool:
    cpu = getattr(torch, "cpu", None)
    try:
        fast = bool(cpu._is_amx_tile_supported() or cpu._is_avx512_bf16_supported())
    except AttributeError:
        fast = False
    if not fast:
        return False
    for m, k, n in ((1, 64, 1), (7, 300, 5), (64, 1024, 96), (256, 4096, 512)):
        a = torch.full((m, k), 2.0**-9, dtype=torch.bfloat16)
        a[:, 0] = 1.0
        b = torch.ones((k, n), dtype=torch.bfloat16)
        expect = 1.0 + (k - 1) * 2.0**-9
        for x, y in ((a, b), (a, b.t().contiguous().t()), (a.t().contiguous().t(), b)):
            outs = [torch.mm(x, y), torch.addmm(torch.zeros(m, n, dtype=torch.bfloat16), x, y),
                    torch.bmm(x.unsqueeze(0).expand(2, m, k), y.unsqueeze(0).expand(2, k, n))[1], torch.mv(x, y[:, 0])]
            for out in outs:
                if out.dtype != torch.bfloat16 or not bool(((out.float() - expect).abs() <= 0.02 * expect).all()):
                    return False
    return True
