"""The model's CPU fast paths give the values and gradients of the plain torch expressions, and
`use_fast_path` picks them where bench/bench_components.py measured them faster."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smallscale.model import gpt
from smallscale.model.gpt import RMSNorm, attention, linear_cross_entropy
from smallscale.model.positions import apply_rotary, rope_cos_sin

AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def force_fast_path(monkeypatch, name: str, taken: bool) -> None:
    """Make `use_fast_path` answer `taken` for `name` (and as before for the others)."""
    choose = gpt.use_fast_path
    monkeypatch.setattr(gpt, "use_fast_path", lambda n, *a: taken if n == name else choose(n, *a))


@pytest.mark.parametrize("transposed_head_grad", [False, True])
@pytest.mark.parametrize("bf16", [False, True])
def test_linear_cross_entropy_matches_f_cross_entropy(bf16, transposed_head_grad, monkeypatch):
    force_fast_path(monkeypatch, "transposed_head_grad", transposed_head_grad)
    torch.manual_seed(0)
    h = torch.randn(300, 64, requires_grad=True)
    weight = torch.randn(97, 64, requires_grad=True)
    targets = torch.randint(0, 97, (300,))
    targets[::7] = -100

    def grads(fn):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, loss = fn()
        (3 * loss).backward()
        out = loss.detach(), logits.detach(), h.grad.clone(), weight.grad.clone()
        h.grad = weight.grad = None
        return out

    def reference():
        logits = F.linear(h, weight)
        return logits, F.cross_entropy(logits.float(), targets, ignore_index=-100)

    ours, ref = grads(lambda: linear_cross_entropy(h, weight, targets)), grads(reference)
    tol = {"atol": 2e-3, "rtol": 1e-2} if bf16 else {"atol": 1e-6, "rtol": 1e-5}
    torch.testing.assert_close(ours[1], ref[1], atol=0, rtol=0)  # the same logits
    for a, b in zip(ours[::2] + ours[3:], ref[::2] + ref[3:], strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_linear_cross_entropy_is_exact_when_a_target_probability_underflows():
    torch.manual_seed(0)
    h, weight, targets = 30 * torch.randn(50, 16), 30 * torch.randn(97, 16), torch.randint(0, 97, (50,))
    logits, loss = linear_cross_entropy(h, weight, targets)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets))


def test_linear_cross_entropy_with_only_ignored_targets_is_nan_like_torch():
    loss = linear_cross_entropy(torch.randn(4, 8), torch.randn(11, 8), torch.full((4,), -100))[1]
    assert loss.isnan()


def test_rmsnorm_matches_torch_values_and_gradients():
    torch.manual_seed(0)
    ours, ref = RMSNorm(64, eps=1e-5), nn.RMSNorm(64, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(1 + 0.1 * torch.randn(64))
        ref.weight.copy_(ours.weight)
    x = torch.randn(4, 16, 64).transpose(0, 1).requires_grad_()  # strided, as q/k under qk_norm
    grad_out = torch.randn(16, 4, 64)
    results = []
    for norm in (ours, ref):
        y = norm(x)
        y.backward(grad_out)
        results.append((y.detach(), x.grad.clone(), norm.weight.grad.clone()))
        x.grad = None
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grad_scale", [1.0, 1e12])
def test_rmsnorm_gradient_matches_torch_when_the_square_overflows(grad_scale):
    # x^2 overflows fp32; a large upstream gradient then makes torch's gradient nan: ours must not hide it
    x = torch.full((2, 4), 4e28, requires_grad=True)
    grad_out = grad_scale * torch.arange(4.0).expand(2, 4)
    grads = []
    for norm in (RMSNorm(4, eps=1e-5), nn.RMSNorm(4, eps=1e-5)):
        norm(x).backward(grad_out)
        grads.append(x.grad.clone())
        x.grad = None
    torch.testing.assert_close(grads[0], grads[1], equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_attention_matches_sdpa_in_training(dtype, monkeypatch):
    force_fast_path(monkeypatch, "matmul_attention", True)
    calls = []
    matmul_attention = gpt._matmul_causal_attention
    monkeypatch.setattr(gpt, "_matmul_causal_attention", lambda *a: calls.append(1) or matmul_attention(*a))
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 32, 16, dtype=dtype, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(2, 4, 32, 16, dtype=dtype)
    results = []
    for fn in (lambda: attention(q, k, v, None, True, 0.0), lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)):
        y = fn()
        y.backward(grad_out)
        results.append((y.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()))
        q.grad = k.grad = v.grad = None
    assert calls == [1]
    tol = {"atol": 3e-2, "rtol": 3e-2} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-5}
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a.float(), b.float(), **tol)


@pytest.mark.parametrize(
    ("cpu_kind", "dtype", "matmul_attention", "transposed_head_grad"),
    [
        ("amx", torch.bfloat16, True, True),
        ("amx", torch.float32, False, False),
        ("avx512", torch.bfloat16, True, False),
        ("avx512", torch.float32, False, False),
        ("avx2", torch.float32, False, False),
    ],
)
def test_fast_paths_are_chosen_per_cpu_kind_and_dtype(cpu_kind, dtype, matmul_attention, transposed_head_grad, monkeypatch):
    monkeypatch.setattr(gpt, "CPU_KIND", cpu_kind)
    assert gpt.use_fast_path("matmul_attention", "cpu", dtype) is matmul_attention
    assert gpt.use_fast_path("transposed_head_grad", "cpu", dtype) is transposed_head_grad
    assert not gpt.use_fast_path("matmul_attention", "cuda", dtype)
    assert not gpt.use_fast_path("transposed_head_grad", "cuda", dtype)


def test_cpu_kind_is_avx2_when_torch_is_restricted_to_avx2():
    code = "from smallscale.model import gpt; print(gpt.CPU_KIND)"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **AVX2_ENV}, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["avx2"]


def test_rotary_gradient_is_the_rotation_by_the_opposite_angle():
    cos, sin = rope_cos_sin(8, 6, 100.0)
    x = torch.randn(2, 3, 8, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: apply_rotary(x, cos.double(), sin.double()), (x,))
