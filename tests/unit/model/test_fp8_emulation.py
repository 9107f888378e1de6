"""FP8 emulation: quantise→matmul→dequantise against an independent float64 reference.

The reference rounds to the E4M3/E5M2 grids in float64 from the formats' definitions (not
through torch's float8 casts), then multiplies exactly in float64. The emulated megatron
Column/Row linears are checked against that reference in a gloo world of size 1 (forward,
backward, state dict) and, in a spawned 2-rank world, with TP=2 and sequence parallelism.
"""

from __future__ import annotations

import dataclasses
import logging
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from megatron.core.fp8_utils import is_first_last_bf16_layer
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.transformer_config import TransformerConfig

from genlip_megatron.compat.versions import torch_at_least
from genlip_megatron.config import Fp8Config
from genlip_megatron.model import fp8_emulation as fe
from genlip_megatron.model.fp8_emulation import (
    E4M3,
    E5M2,
    Fp8EmulatedColumnParallelLinear,
    Fp8EmulatedRowParallelLinear,
    compute_scale,
    emulation_config_kwargs,
    fp8_emulated_linear,
    fp8_layer_numbers,
    fp8_matmul,
    quantize_fp8,
)

# ---------------------------------------------------------------------------------------------
# float64 reference, written from the format definitions
# ---------------------------------------------------------------------------------------------

# (mantissa bits, exponent bias, largest finite value). E4M3FN: no inf, max 1.75 * 2**8;
# E5M2: IEEE-like, max 1.75 * 2**15. Both have subnormals below 2**(1 - bias).
GRID = {E4M3: (3, 7, 448.0), E5M2: (2, 15, 57344.0)}


def round_to_grid(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round float64 values to the nearest FP8 value of ``dtype`` (ties to even), saturating."""
    man, bias, vmax = GRID[dtype]
    a = v.abs().clamp(max=vmax)
    exp = (torch.frexp(a).exponent - 1).clamp(min=1 - bias)   # a = 1.f * 2**exp (normal)
    step = torch.ldexp(torch.ones_like(a), exp - man)          # grid spacing around a
    return torch.copysign(torch.round(a / step) * step, v)     # torch.round: half to even


def ref_quantize(x: torch.Tensor, dtype: torch.dtype, margin: int = 0):
    """float64 codes and scale_inv of per-tensor current scaling (scale held in FP32)."""
    x64 = x.detach().double()
    amax = x64.abs().max().item()
    scale = 1.0 if amax == 0 else GRID[dtype][2] / amax / 2.0 ** margin
    scale = torch.tensor(scale, dtype=torch.float32).double()      # TE keeps the scale in FP32
    scale_inv = (1.0 / scale).float().double()
    return round_to_grid(x64 * scale, dtype), scale_inv


def ref_dequant(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    codes, scale_inv = ref_quantize(x, dtype)
    return codes * scale_inv


def ref_fwd(x, w):
    """float64 emulated ``x @ w.T``: ``[..., K] x [N, K] -> [..., N]`` (no bias)."""
    x2 = x.reshape(-1, x.shape[-1])
    return (ref_dequant(x2, E4M3) @ ref_dequant(w, E4M3).T).reshape(*x.shape[:-1], w.shape[0])


def ref_bwd(x, w, dy, grad_dtype=E5M2):
    """float64 emulated (dgrad ``[..., K]``, wgrad ``[N, K]``) for upstream ``dy [..., N]``."""
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    dq = ref_dequant(dy2, grad_dtype)
    dx = (dq @ ref_dequant(w, E4M3)).reshape(x.shape)
    return dx, dq.T @ ref_dequant(x2, E4M3)


def assert_close_to(got: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5):
    """``got`` equals the float64 ``ref`` up to FP32 accumulation (relative to max|ref|)."""
    err = (got.double() - ref).abs().max().item()
    assert err <= rel * max(ref.abs().max().item(), 1e-30), (err, ref.abs().max().item())


# ---------------------------------------------------------------------------------------------
# Quantisation and scaled GEMM
# ---------------------------------------------------------------------------------------------

def _test_tensor(seed: int, shape=(64, 96)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 3
    x.view(-1)[:5] = torch.tensor([40.0, -25.0, 1e-5, -3e-6, 0.0])   # outliers, subnormal range
    return x


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("margin", [0, 2])
def test_quantize_matches_float64_grid(dtype, margin):
    x = _test_tensor(1)
    x_q, scale_inv = quantize_fp8(x, dtype, margin=margin)
    codes, ref_scale_inv = ref_quantize(x, dtype, margin)
    assert x_q.dtype == dtype and x_q.shape == x.shape
    assert scale_inv.item() == ref_scale_inv.item()
    assert torch.equal(x_q.double(), codes)
    # margin m: the amax lands on fp8_max / 2**m (a grid point), nothing saturates
    assert x_q.double().abs().max().item() == GRID[dtype][2] / 2 ** margin


@pytest.mark.skipif(not torch_at_least(fe.CPU_SCALED_MM_TORCH),
                    reason=f"CPU FP8 torch._scaled_mm needs torch >= {fe.CPU_SCALED_MM_TORCH}, "
                           f"have {torch.__version__} (the emulation dequantises instead)")
def test_scaled_mm_runs_on_cpu():
    """The module docstring's claim (torch 2.10, 2.13): CPU torch._scaled_mm works for all pairs."""
    for a, b in [(E4M3, E4M3), (E5M2, E4M3), (E4M3, E5M2), (E5M2, E5M2)]:
        assert fe.scaled_mm_supported("cpu", a, b), (a, b)


def test_missing_scaled_mm_degrades_with_one_clear_warning(monkeypatch, caplog):
    """Where CPU _scaled_mm is missing (torch < 2.8) the emulation warns once and still matches
    the float64 reference through the dequantise path."""
    def no_kernel(*args, **kwargs):
        raise NotImplementedError("Could not run 'aten::_scaled_mm' with arguments from the "
                                  "'CPU' backend.")

    monkeypatch.setattr(torch, "_scaled_mm", no_kernel)
    monkeypatch.setattr(fe, "_WARNED_FALLBACK", set())
    fe.scaled_mm_supported.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=fe.__name__):
            assert not fe.scaled_mm_supported("cpu", E4M3, E4M3)
            assert not fe.scaled_mm_supported("cpu", E5M2, E4M3)
            a, b = _test_tensor(2, (8, 16)), _test_tensor(3, (4, 16))
            got = fp8_matmul(a, b)
    finally:
        fe.scaled_mm_supported.cache_clear()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "dequantise-then-matmul" in warnings[0] and "NotImplementedError" in warnings[0]
    assert f"torch >= {fe.CPU_SCALED_MM_TORCH}" in warnings[0]
    qa, sa = ref_quantize(a, E4M3)
    qb, sb = ref_quantize(b, E4M3)
    # exact float64 product vs FP32 accumulation of K=16 terms: a few FP32 ulps
    torch.testing.assert_close(got.double(), (qa * sa) @ (qb * sb).T, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("path", ["scaled_mm", "dequantise"])
@pytest.mark.parametrize("a_dtype,b_dtype", [(E4M3, E4M3), (E5M2, E4M3)])
def test_fp8_matmul_matches_float64_reference(monkeypatch, path, a_dtype, b_dtype):
    if path == "dequantise":
        monkeypatch.setattr(fe, "scaled_mm_supported", lambda *args: False)
    a, b = _test_tensor(2, (48, 80)), _test_tensor(3, (40, 80))
    got = fp8_matmul(a, b, a_dtype=a_dtype, b_dtype=b_dtype)
    qa, sa = ref_quantize(a, a_dtype)
    qb, sb = ref_quantize(b, b_dtype)
    ref = (qa * sa) @ (qb * sb).T                                  # exact in float64
    # FP32 accumulation of K products: |err| <= K * 2**-24 * sum|a||b| (with slack 2)
    bound = 2 * a.shape[1] * 2.0 ** -24 * ((qa * sa).abs() @ (qb * sb).abs().T)
    assert got.dtype == torch.float32
    assert ((got.double() - ref).abs() <= bound + 1e-30).all()


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_emulation_error_has_fp8_magnitude(dtype):
    """Emulated minus exact product is FP8-sized: below the rounding bound, far above FP32's."""
    man, bias, _ = GRID[dtype]
    a, b = _test_tensor(4, (64, 128)), _test_tensor(5, (32, 128))
    exact = a.double() @ b.double().T
    err = fp8_matmul(a, b, a_dtype=dtype, b_dtype=dtype).double() - exact

    def elem_bound(x):   # |q - x| <= max(2**-(man+1) |x|, half the subnormal step), real units
        _, scale_inv = ref_quantize(x, dtype)
        return torch.maximum(x.double().abs() * 2.0 ** -(man + 1),
                             2.0 ** (1 - bias - man) / 2 * scale_inv.expand(x.shape))

    ea, eb = elem_bound(a), elem_bound(b)
    aa, bb = a.double().abs(), b.double().abs()
    bound = ea @ bb.T + aa @ eb.T + ea @ eb.T + 4 * 128 * 2.0 ** -24 * (aa @ bb.T)
    assert (err.abs() <= bound).all()
    rel = (err.norm() / exact.norm()).item()
    fp32_rel = ((a @ b.T).double() - exact).norm().item() / exact.norm().item()
    u = 2.0 ** -(man + 1)
    assert u / 8 < rel < u, rel          # measured: e4m3 3.5 %, e5m2 7.3 %
    assert fp32_rel < 1e-6               # a no-op "emulation" would sit here


def test_amax_zero_gives_unit_scale_and_zeros():
    x_q, scale_inv = quantize_fp8(torch.zeros(4, 8))
    assert scale_inv.item() == 1.0 and torch.equal(x_q.float(), torch.zeros(4, 8))
    assert torch.equal(fp8_matmul(torch.zeros(4, 16), torch.randn(8, 16)), torch.zeros(4, 8))


def test_outlier_sets_scale_and_flushes_small_values():
    x = torch.ones(256) * 0.01
    x[7] = -1e4
    x_q, scale_inv = quantize_fp8(x, E4M3)
    assert x_q[7].float().item() == -448.0
    assert scale_inv.item() == pytest.approx(1e4 / 448, rel=1e-6)
    # 0.01 * 448 / 1e4 = 4.5e-4 is below half the smallest E4M3 subnormal (2**-9): flushed to 0
    assert (x_q.float()[torch.arange(256) != 7] == 0).all()


def test_nan_propagates():
    x = torch.randn(4, 16)
    x[1, 3] = float("nan")
    assert torch.isnan(fp8_matmul(x, torch.randn(8, 16))[1]).all()


def test_compute_scale():
    amax = torch.tensor
    assert compute_scale(amax(2.0)).item() == 224.0
    assert compute_scale(amax(2.0), E5M2).item() == 28672.0
    assert compute_scale(amax(2.0), margin=1).item() == 112.0
    assert compute_scale(amax(2.0), power_of_2=True).item() == 128.0
    assert compute_scale(amax(1.0), power_of_2=True).item() == 256.0
    for bad in (0.0, float("inf"), float("nan")):
        assert compute_scale(amax(bad)).item() == 1.0
    assert compute_scale(amax(1e-45)).item() == torch.finfo(torch.float32).max


# ---------------------------------------------------------------------------------------------
# Layer selection and config helpers
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("on,start,end", [(True, 1, 1), (False, 1, 1), (True, 2, 0),
                                          (True, 0, 3)])
def test_fp8_layer_numbers_mirror_megatron(on, start, end):
    cfg = Fp8Config(first_last_layers_bf16=on, num_layers_at_start_in_bf16=start,
                    num_layers_at_end_in_bf16=end)
    mcfg = SimpleNamespace(num_layers=6, first_last_layers_bf16=on,
                           num_layers_at_start_in_bf16=start, num_layers_at_end_in_bf16=end)
    got = fp8_layer_numbers(6, cfg)
    assert got == {n + 1 for n in range(6) if not is_first_last_bf16_layer(mcfg, n)}
    assert fp8_layer_numbers(6, None) == set()


def test_fp8_layer_numbers_warns_when_no_layer_is_fp8(caplog):
    with caplog.at_level(logging.WARNING):
        assert fp8_layer_numbers(2, Fp8Config(first_last_layers_bf16=True)) == set()
    assert "no layer runs in FP8" in caplog.text
    with pytest.raises(ValueError, match="num_layers_at_start_in_bf16"):
        fp8_layer_numbers(4, Fp8Config(first_last_layers_bf16=True, num_layers_at_start_in_bf16=-1))


@dataclasses.dataclass
class EmuConfig(TransformerConfig):
    """What the GenLIP TransformerConfig subclass adds for the emulation."""

    fp8_emulation_format: str | None = None


def make_config(**kw) -> EmuConfig:
    base = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
            "use_cpu_initialization": True}
    return EmuConfig(**{**base, **kw})


def test_emulation_config_kwargs_leave_megatron_fp8_off():
    cfg = make_config(**emulation_config_kwargs(Fp8Config(format="e4m3", margin=1)))
    assert (cfg.fp8, cfg.fp8_emulation_format, cfg.fp8_margin) == (None, "e4m3", 1)


# ---------------------------------------------------------------------------------------------
# Emulated megatron layers, one process
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def tp_group(gloo_world):
    """gloo world of size 1 (shared fixture)."""
    return gloo_world


def _init(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return lambda w: w.copy_(torch.randn(w.shape, generator=gen) * 0.1)


def _layers(config, tp_group, col_skip=False, row_skip=False, cls=(Fp8EmulatedColumnParallelLinear,
                                                                     Fp8EmulatedRowParallelLinear)):
    col = cls[0](32, 64, config=config, init_method=_init(1), bias=True, skip_bias_add=col_skip,
                 tp_group=tp_group)
    row = cls[1](64, 32, config=config, init_method=_init(2), bias=True, input_is_parallel=True,
                 skip_bias_add=row_skip, tp_group=tp_group)
    with torch.no_grad():   # megatron zero-inits biases; make them visible in the checks
        col.bias.copy_(torch.linspace(-1, 1, 64).chunk(tp_group.size())[tp_group.rank()])
        row.bias.copy_(torch.linspace(1, -1, 32))
    return col, row


def test_column_row_forward_backward_match_reference(tp_group):
    col, row = _layers(make_config(), tp_group)
    x = _test_tensor(6, (6, 2, 32)).requires_grad_()
    y, y_bias = col(x)
    dh = []
    y.register_hook(dh.append)
    z, z_bias = row(y)
    g = _test_tensor(7, (6, 2, 32))
    (z * g).sum().backward()

    assert y_bias is None and z_bias is None and y.shape == (6, 2, 64) and z.shape == (6, 2, 32)
    assert_close_to(y, ref_fwd(x, col.weight) + col.bias.double())
    assert_close_to(z, ref_fwd(y, row.weight) + row.bias.double())
    dy_row, dw_row = ref_bwd(y, row.weight, g)
    assert_close_to(row.weight.grad, dw_row)
    assert_close_to(row.bias.grad, g.double().sum((0, 1)))
    assert_close_to(dh[0], dy_row)
    dx, dw_col = ref_bwd(x, col.weight, dh[0])
    assert_close_to(x.grad, dx)
    assert_close_to(col.weight.grad, dw_col)
    assert_close_to(col.bias.grad, dh[0].double().sum((0, 1)))


def test_skip_bias_add_returns_bias(tp_group):
    col, row = _layers(make_config(), tp_group, col_skip=True, row_skip=True)
    x = _test_tensor(8, (4, 2, 32))
    y, y_bias = col(x)
    z, z_bias = row(y)
    assert y_bias is col.bias and z_bias is row.bias
    assert_close_to(y, ref_fwd(x, col.weight))
    assert_close_to(z, ref_fwd(y, row.weight))


def test_state_dict_keys_match_megatron_and_differ_by_fp8_error(tp_group):
    cfg = make_config()
    emu = _layers(cfg, tp_group)
    plain = _layers(cfg, tp_group, cls=(ColumnParallelLinear, RowParallelLinear))
    x = _test_tensor(9, (8, 2, 32))
    for e, p in zip(emu, plain):
        assert list(e.state_dict()) == list(p.state_dict())
        p.load_state_dict(e.state_dict(), strict=True)
        e.load_state_dict(p.state_dict(), strict=True)
        y_e, y_p = e(x)[0], p(x)[0]
        rel = ((y_e - y_p).norm() / y_p.norm()).item()
        assert 1e-3 < rel < 0.1, rel
        x = y_p


def test_format_e4m3_and_high_precision_wgrad_from_config(tp_group):
    col, _ = _layers(make_config(fp8_emulation_format="e4m3", fp8_wgrad=False), tp_group)
    x = _test_tensor(10, (4, 2, 32)).requires_grad_()
    g = _test_tensor(11, (4, 2, 64))
    (col(x)[0] * g).sum().backward()
    dx, _ = ref_bwd(x, col.weight, g, grad_dtype=E4M3)
    assert_close_to(x.grad, dx)
    assert_close_to(col.weight.grad, g.double().reshape(-1, 64).T @ x.double().reshape(-1, 32))


def test_bad_format_in_config_is_refused(tp_group):
    col, _ = _layers(make_config(fp8_emulation_format="e5m2"), tp_group)
    with pytest.raises(ValueError, match="precision.fp8.format"):
        col(torch.randn(2, 1, 32))


def test_bf16_and_frozen_weight(tp_group):
    col, _ = _layers(make_config(params_dtype=torch.bfloat16, bf16=True), tp_group)
    col.weight.requires_grad_(False)
    x = _test_tensor(12, (4, 2, 32)).bfloat16().requires_grad_()
    y = col(x)[0]
    y.float().sum().backward()
    assert y.dtype == x.grad.dtype == col.bias.grad.dtype == torch.bfloat16
    assert col.weight.grad is None
    assert_close_to(y, ref_fwd(x, col.weight) + col.bias.double(), rel=1e-2)
    assert_close_to(x.grad, ref_bwd(x, col.weight, torch.ones(4, 2, 64))[0], rel=1e-2)


def test_sequence_parallel_and_allreduce_paths_in_world_of_one(tp_group):
    w = torch.randn(16, 32)
    x = torch.randn(4, 2, 32, requires_grad=True)
    outs, grads = [], []
    for kw in ({}, {"sequence_parallel": True}, {"allreduce_dgrad": True}):
        x.grad = None
        y = fp8_emulated_linear(x, w, tp_group=tp_group, **kw)
        y.sum().backward()
        outs.append(y)
        grads.append(x.grad.clone())
    assert all(torch.equal(outs[0], o) for o in outs) and all(torch.equal(grads[0], g)
                                                              for g in grads)


# ---------------------------------------------------------------------------------------------
# TP=2 with sequence parallelism (2 spawned gloo ranks)
# ---------------------------------------------------------------------------------------------

def _cpu_setup():
    try:
        from genlip_megatron.compat import apply_cpu_compat
    except ImportError:
        # megatron's reduce_scatter_to_sequence_parallel_region allocates on CUDA; this spawned
        # process is ours alone, so point it at the CPU.
        torch.cuda.current_device = lambda: "cpu"
    else:
        apply_cpu_compat()


def _all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def _sp_worker(rank: int, rdzv: str):
    _cpu_setup()
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=2)
    try:
        cfg = make_config(tensor_model_parallel_size=2, sequence_parallel=True)
        group = dist.group.WORLD
        col, row = _layers(cfg, group)        # same seeds: each rank holds its shard
        s = slice(rank * 3, rank * 3 + 3)
        x_full, g_full = _test_tensor(13, (6, 2, 32)), _test_tensor(14, (6, 2, 32))
        x = x_full[s].clone().requires_grad_()
        y, _ = col(x)                         # [6, 2, 64 / tp]: gathered sequence
        dh = []
        y.register_hook(dh.append)
        z, _ = row(y)                         # [3, 2, 32]: reduce-scattered sequence
        (z * g_full[s]).sum().backward()

        assert y.shape == (6, 2, 32) and z.shape == (3, 2, 32)
        assert_close_to(y, ref_fwd(x_full, col.weight) + col.bias.double())
        ws_row, ys = _all_gather(row.weight.detach()), _all_gather(y.detach())
        z_ref = sum(ref_fwd(yr, wr) for yr, wr in zip(ys, ws_row)) + row.bias.double()
        assert_close_to(z, z_ref[s])
        dy_row, dw_row = ref_bwd(y, row.weight, g_full)   # the row GEMM sees the gathered grad
        assert_close_to(row.weight.grad, dw_row)
        assert_close_to(row.bias.grad, g_full[s].double().sum((0, 1)))  # TP-reduced later
        assert_close_to(dh[0], dy_row)
        ws_col, dhs = _all_gather(col.weight.detach()), _all_gather(dh[0])
        dx_ref = sum(ref_bwd(x_full, wc, d)[0] for wc, d in zip(ws_col, dhs))
        assert_close_to(x.grad, dx_ref[s])
        assert_close_to(col.weight.grad, ref_bwd(x_full, col.weight, dh[0])[1])
    finally:
        dist.destroy_process_group()


def test_tensor_and_sequence_parallel_two_ranks(tmp_path):
    mp.spawn(_sp_worker, args=(str(tmp_path / "rdzv"),), nprocs=2, join=True)
