"""The optimised paths compute what the plain path computes (tiny random models, CPU).

Tolerances, as max|fast - plain| / max|plain| unless said otherwise:
- 1e-6 for rearrangements of the same float32 matmuls (fused projections: one matmul over the concatenated
  weights; oneDNN instead of MKL): only the summation order inside a dot product changes;
- 1e-5 for channels_last (NHWC convolutions use other algorithms, e.g. Winograd) and the SDPA kernel choice;
- 1e-5 for torch.compile (Inductor generates its own kernels and may reassociate reductions);
- fp8 linears: relative L2 error <= 0.08 on the UNet output (float8 e4m3 keeps 3 mantissa bits: each
  quantised value is off by up to 6%, and a matmul averages K such errors);
- bf16 VAE decode: relative error <= 0.03 (8 mantissa bits through the decoder).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from sdxl.models import fast
from sdxl.models.config import tiny_config
from sdxl.models.factory import randomize_
from sdxl.models.unet import Attention, BasicTransformerBlock, ResBlock, UNet
from sdxl.models.vae import AutoencoderKL
from sdxl.pipeline import SDXL
from sdxl.request import GenerationRequest, LoraSpec
from sdxl.weights import lora as L
from test_lora import make_models, outputs, write_kohya


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def make_unet(seed: int = 0) -> UNet:
    return randomize_(UNet(tiny_config().unet), seed, std=0.05).eval()


def unet_inputs(unet: UNet, batch: int = 2, side: int = 16, seed: int = 1):
    cfg = unet.cfg
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, side, side, generator=g)
    t = torch.tensor([500.0, 20.0][:batch])
    context = torch.randn(batch, 77, cfg.context_dim, generator=g)
    y = torch.randn(batch, cfg.adm_in_channels, generator=g)
    return x, t, context, y


# ---------------------------------------------------------------------------------------------------------
# Fused q/k/v and k/v projections
# ---------------------------------------------------------------------------------------------------------


def fused_modules(unet: UNet) -> list[fast.FusedAttention]:
    return [m for m in unet.modules() if isinstance(m, fast.FusedAttention)]


def test_fuse_qkv_is_a_module_swap_same_output_same_names_no_copies():
    unet = make_unet()
    args = unet_inputs(unet)
    keys = {k: v.shape for k, v in unet.state_dict().items()}
    attns = [m for m in unet.modules() if isinstance(m, Attention)]
    params = dict(unet.named_parameters())
    with torch.no_grad():
        ref = unet(*args)
        assert fast.fuse_qkv(unet) == len(attns)
        out = unet(*args)
    assert {k: v.shape for k, v in unet.state_dict().items()} == keys  # no new or renamed tensors
    assert all(p is params[n] for n, p in unet.named_parameters())  # the same Parameter objects
    assert rel_err(out, ref) <= 1e-6
    fused = fused_modules(unet)
    assert len(fused) == len(attns) and {a.is_cross_attention for a in fused} == {True, False}
    for a in fused:
        # the Parameters ARE rows of the one matrix: nothing is concatenated per call, nothing held twice
        assert a.fused_qkv and a.views_intact()
        first = a.to_k if a.is_cross_attention else a.to_q
        assert first.weight.data_ptr() == a.fused_weight.data_ptr()
        assert a.to_v.weight.data_ptr() == a.fused_weight[-a.to_v.weight.shape[0]].data_ptr()
    # back to the literal module: exactly the eager numbers
    assert fast.unfuse_qkv(unet) == len(attns) and not fast.is_fused(unet)
    assert all(type(m) is Attention for m in unet.modules() if isinstance(m, Attention))
    with torch.no_grad():
        assert torch.equal(unet(*args), ref)


def test_fused_matrix_follows_in_place_updates():
    """load_state_dict copies into the Parameters (views): the fused matrix sees the new values."""
    unet = make_unet(0)
    fast.fuse_qkv(unet)
    other = make_unet(5)
    args = unet_inputs(unet)
    unet.load_state_dict(other.state_dict())
    assert all(a.views_intact() for a in fused_modules(unet))
    with torch.no_grad():
        assert rel_err(unet(*args), other(*args)) <= 1e-6


def test_fused_relays_after_to_deepcopy_and_assign():
    """What gives the Parameters new storage breaks the views; the next forward lays the matrix out again."""
    unet = make_unet(0)
    args = unet_inputs(unet)
    with torch.no_grad():
        ref = unet(*args)
    fast.fuse_qkv(unet)
    attn = fused_modules(unet)[0]
    # dtype round trip: the matrix is dropped before the conversion (not converted as a second copy)
    unet.to(torch.float64).to(torch.float32)
    assert attn.fused_weight is None and not attn.views_intact()
    with torch.inference_mode():  # a relayout inside inference_mode leaves normal (not inference) tensors
        assert rel_err(unet(*args), ref) <= 1e-6
    assert attn.fused_weight.dtype == torch.float32 and attn.views_intact()
    assert not attn.fused_weight.is_inference() and not attn.to_q.weight.is_inference()
    # deepcopy: the copy relays over its own Parameters; in-place updates reach it, not the original
    twin = copy.deepcopy(unet)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
        twin_out = twin(*args)
        assert rel_err(unet(*args), ref) <= 1e-6
        halved = make_unet(0)
        for p in halved.parameters():
            p.mul_(0.5)
        assert rel_err(twin_out, halved(*args)) <= 1e-6
    twin_attn = fused_modules(twin)[0]
    assert twin_attn.views_intact() and twin_attn.fused_weight.data_ptr() != attn.fused_weight.data_ptr()
    # assign=True replaces the Parameters: the next forward lays the matrix out again
    fresh = make_unet(7)
    unet.load_state_dict(fresh.state_dict(), assign=True)
    with torch.no_grad():
        assert rel_err(unet(*args), fresh(*args)) <= 1e-6
    assert attn.views_intact()


def test_fused_projections_train_like_unfused():
    """With gradients on, the fused path concatenates (differentiably): same values and same gradients."""
    def grads(fused: bool):
        unet = make_unet(3).train()
        if fused:
            fast.fuse_qkv(unet)
        out = unet(*unet_inputs(unet))
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters()}

    out_a, g_a = grads(False)
    out_b, g_b = grads(True)
    assert rel_err(out_b, out_a) <= 1e-6
    assert all(torch.allclose(g_a[n], g_b[n], rtol=1e-4, atol=1e-8) for n in g_a)
    assert g_b["input_blocks.4.1.transformer_blocks.0.attn1.to_k.weight"].abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------
# The product path: SDXL.load applies the exact switches by default
# ---------------------------------------------------------------------------------------------------------


def test_load_applies_the_exact_switches_and_generates_the_eager_image(tiny_files, tmp_path):
    """fast=True (the default) vs fast=False on the same file: the same PNG (8-bit difference <= 1) and the
    same latents to float32 rounding (max |a - b| <= 1e-5 * max |a|; measured 4e-8 to 2e-7: only the summation
    order inside the fused / oneDNN / NHWC kernels differs), without and with a LoRA (forward hooks, which
    hold the fused projections off)."""
    plain = SDXL.load(tiny_files["base"], fast=False)
    quick = SDXL.load(tiny_files["base"])
    assert not fast.is_fused(plain.unet) and fast.is_fused(quick.unet)
    assert quick.unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert quick.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    if fast.onednn_linear_available():
        assert isinstance(quick.unet.time_embed[0], fast.OneDNNLinear)
        assert isinstance(quick.text.clip_g.text_projection, fast.OneDNNLinear)
    assert not any(isinstance(m, fast.OneDNNLinear) for m in plain.unet.modules())
    assert quick.unet.state_dict().keys() == plain.unet.state_dict().keys()

    lora = write_kohya(tmp_path, seed=3)[0]
    latents = []
    for loras in ((), (LoraSpec(str(lora), 0.8),)):
        req = GenerationRequest(prompt="a red cube", seed=7, steps=4, width=64, height=64, sampler="euler",
                                loras=loras)
        a, b = plain.generate(req), quick.generate(req)
        img_a = np.asarray(a.images[0], dtype=np.int16)
        img_b = np.asarray(b.images[0], dtype=np.int16)
        assert img_a.std() > 1.0 and np.abs(img_a - img_b).max() <= 1
        err = ((a.latents - b.latents).abs().max() / a.latents.abs().max()).item()
        assert err <= 1e-5, err
        latents.append(a.latents)
    assert not torch.allclose(latents[0], latents[1], atol=1e-3)  # the LoRA did change the image


def test_lora_fused_into_the_weights_of_a_fused_model(tmp_path):
    """`LoraPatch.fuse()` writes W + delta into the Parameters in place; on a fused model they are rows of the
    fused matrix, so the one-matmul path computes with the LoRA; `unfuse()` restores every bit."""
    lora = L.load_lora(write_kohya(tmp_path, seed=4)[0])
    plain, quick = make_models(), make_models()
    fast.fuse_qkv(quick["unet"])
    with torch.no_grad():
        before = outputs(quick)
        with L.apply(plain, lora) as p_plain, L.apply(quick, lora) as p_quick:
            p_plain.fuse()
            p_quick.fuse()
            attn = quick["unet"].input_blocks[4][1].transformer_blocks[0].attn1
            assert attn.fused_qkv and attn.views_intact()  # the one-matmul path, over the patched rows
            want, got = outputs(plain), outputs(quick)
            p_quick.unfuse()
        after = outputs(quick)
    assert all(rel_err(g, w) <= 1e-5 for g, w in zip(got, want))
    assert rel_err(got[0], before[0]) > 1e-3  # the LoRA did change the UNet's output
    assert all(torch.equal(a, b) for a, b in zip(after, before))


def test_compile_guards_hooks_so_a_later_lora_runs():
    """Dynamo ignores forward hooks added after compiling unless told to guard them: `configure_inductor`
    turns the guard on, so a LoRA hooked on a compiled model recompiles instead of being skipped."""
    torch._dynamo.reset()
    fast.configure_inductor("cpu")
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.proj(x).relu()

    net = Net()
    net.compile(backend="eager", fullgraph=True)
    x = torch.randn(2, 4)
    with torch.no_grad():
        before = net(x)
        handle = net.proj.register_forward_hook(lambda m, args, out: out + 1.0)  # as a LoRA hooks a layer
        after = net(x)
        handle.remove()
        again = net(x)
    assert torch.allclose(after, (net.proj(x) + 1.0).relu())
    assert not torch.allclose(after, before) and torch.equal(again, before)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------------
# channels_last, oneDNN linears, SDPA backend
# ---------------------------------------------------------------------------------------------------------


def test_channels_last_and_fused_same_output():
    unet = make_unet(2)
    args = unet_inputs(unet, side=12)
    with torch.no_grad():
        ref = unet(*args)
        model = fast.optimize(unet, fused_qkv=True, channels_last=True, onednn=False)
        out = model(*args)
    assert unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.skipif(not fast.onednn_linear_available(), reason="this PyTorch has no oneDNN linear")
def test_onednn_linears_same_output_same_parameters():
    unet = make_unet(4)
    args = unet_inputs(unet)
    params = dict(unet.named_parameters())
    with torch.no_grad():
        ref = unet(*args)
        switched = fast.use_onednn_linears(unet)
        out = unet(*args)
    assert switched > 0
    assert isinstance(unet.time_embed[0], fast.OneDNNLinear)
    assert all(p is params[n] for n, p in unet.named_parameters())  # the same tensors, not copies
    assert rel_err(out, ref) <= 1e-6
    fast.fuse_qkv(unet)  # the fused projections go through oneDNN too
    assert all(a.project_fn is fast.onednn_linear for a in fused_modules(unet))
    with torch.no_grad():
        assert rel_err(unet(*args), ref) <= 1e-6
    assert fast.use_onednn_linears(unet, enabled=False) == switched
    assert type(unet.time_embed[0]) is torch.nn.Linear


def test_sdpa_backend_wrapper_same_output():
    unet = make_unet(6)
    args = unet_inputs(unet)
    with torch.no_grad():
        ref = unet(*args)
        out = fast.WithSDPABackend(unet, "math")(*args)
        out2 = fast.optimize(unet, channels_last=False, onednn=False, sdpa_backend=["flash", "math"])(*args)
    assert rel_err(out, ref) <= 1e-5 and rel_err(out2, ref) <= 1e-5
    with pytest.raises(ValueError):
        fast.sdpa_backends("fastest")


# ---------------------------------------------------------------------------------------------------------
# torch.compile: no graph breaks, same numbers
# ---------------------------------------------------------------------------------------------------------


def test_unet_traces_as_one_graph_with_every_switch():
    """fullgraph=True: a graph break anywhere in the UNet (fused, channels_last, SDPA choice) is an error."""
    torch._dynamo.reset()
    unet = make_unet(8)
    args = unet_inputs(unet)
    with torch.no_grad():
        ref = unet(*args)
        model = fast.optimize(unet, fused_qkv=True, channels_last=True, onednn=False, sdpa_backend="math")
        # fullgraph=True raises on any graph break. The aot_eager backend runs AOT-autograd's decompositions
        # without code generation: fast, and it checks the traced graph's numbers.
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
        out = compiled(*args)
    # fp32 with a different summation order (decomposed ops, channels_last, fused QKV): ~1e-5 seen, and it
    # moves with the thread count; a wrong op would be O(1)
    assert rel_err(out, ref) <= 1e-4
    torch._dynamo.reset()


@pytest.mark.slow
def test_inductor_compiled_blocks_match_eager(tmp_path):
    """Inductor (C++ code generation on the CPU) on the UNet's two building blocks, regional-compile style."""
    torch._dynamo.reset()
    unet = make_unet(9)
    fast.fuse_qkv(unet)
    block = next(m for m in unet.modules() if isinstance(m, BasicTransformerBlock))
    res = next(m for m in unet.modules() if isinstance(m, ResBlock) and not isinstance(m.skip_connection,
                                                                                         torch.nn.Identity))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 64, block.attn1.to_q.in_features, generator=g)
    context = torch.randn(2, 77, unet.cfg.context_dim, generator=g)
    fmap = torch.randn(2, res.in_layers[2].in_channels, 8, 8, generator=g)
    emb = torch.randn(2, unet.cfg.time_embed_dim, generator=g)
    with torch.no_grad():
        ref_block, ref_res = block(tokens, context), res(fmap, emb)
        assert fast.compile_regions(unet, (BasicTransformerBlock, ResBlock)) > 0
        out_block, out_res = block(tokens, context), res(fmap, emb)
    assert rel_err(out_block, ref_block) <= 1e-5
    assert rel_err(out_res, ref_res) <= 1e-5
    # the portable compile cache ("mega-cache") of what was just compiled, where this torch has it
    if hasattr(torch.compiler, "save_cache_artifacts"):
        assert fast.save_compile_artifacts(tmp_path / "artifacts.bin")
        assert (tmp_path / "artifacts.bin").stat().st_size > 0
        assert fast.load_compile_artifacts(tmp_path / "artifacts.bin")
    torch._dynamo.reset()


def test_compile_cache_settings(tmp_path, monkeypatch):
    import torch._inductor.config as inductor_config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    path = fast.enable_compile_cache(tmp_path / "cache")
    assert path.is_dir() and inductor_config.fx_graph_cache
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(path)
    assert fast.load_compile_artifacts(tmp_path / "missing.bin") is False


# ---------------------------------------------------------------------------------------------------------
# fp8 linears
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not fast.fp8_supported("cpu"), reason="no float8 matmul on this CPU build")
def test_fp8_linears_close_to_bf16():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g)
    values, scales = fast.quantize_fp8_rows(w)
    assert values.dtype == torch.float8_e4m3fn and scales.shape == (64, 1)
    assert ((values.float() * scales - w).abs() <= w.abs().amax(1, keepdim=True) / 16 + 1e-6).all()

    unet = make_unet(10).to(torch.bfloat16)
    args = [a.to(torch.bfloat16) if a.is_floating_point() and a.ndim > 1 else a for a in unet_inputs(unet)]
    with torch.no_grad():
        ref = unet(*args).float()
        n = fast.use_fp8_linears(unet)
        out = unet(*args).float()
    assert n > 0 and isinstance(unet.input_blocks[4][1].proj_in, fast.Float8Linear)
    assert unet.input_blocks[4][1].transformer_blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn
    rel_l2 = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel_l2 <= 0.08
    unet.to(torch.bfloat16)  # a dtype cast leaves the float8 weights (and their float32 scales) alone
    proj = unet.input_blocks[4][1].proj_in
    assert proj.weight.dtype == torch.float8_e4m3fn and proj.weight_scale.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------
# CUDA graphs (the CPU fallback here; the capture itself runs in bench/gpu_check.sh)
# ---------------------------------------------------------------------------------------------------------


def test_cuda_graph_runner_falls_back_to_the_function_on_cpu():
    calls = []

    def fn(a, b):
        calls.append(1)
        return a + b

    runner = fast.CUDAGraphRunner(fn)
    out = runner(torch.ones(2), torch.ones(2))
    assert torch.equal(out, torch.full((2,), 2.0)) and len(calls) == 1 and runner.captures == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_graph_runner_replays_the_unet():
    unet = make_unet(11).cuda()
    args = [a.cuda() for a in unet_inputs(unet)]
    runner = fast.CUDAGraphRunner(unet)
    with torch.inference_mode():
        ref = unet(*args)
        first = runner(*args)
        args2 = [args[0] * 0.5] + list(args[1:])
        second = runner(*args2)
        assert runner.captures == 1
        assert rel_err(first, ref) <= 1e-5 and rel_err(second, unet(*args2)) <= 1e-5


# ---------------------------------------------------------------------------------------------------------
# A half-precision VAE decode that cannot overflow
# ---------------------------------------------------------------------------------------------------------


def test_bf16_vae_decode_stays_finite_where_fp16_overflows():
    vae = randomize_(AutoencoderKL(tiny_config().vae), 3, std=0.05).eval()
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(2.5e5)  # first activations ~1e6: far beyond float16's 65504
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = vae.decode(z)
        fp16 = copy.deepcopy(vae).half().decode(z.half())
        bf16_vae = fast.half_precision_vae(copy.deepcopy(vae))
        out = bf16_vae.decode(z)
    assert torch.isfinite(ref).all()
    assert not torch.isfinite(fp16).all()  # the setup really overflows float16
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert rel_err(out, ref) <= 0.03


# ---------------------------------------------------------------------------------------------------------
# The benchmark program itself
# ---------------------------------------------------------------------------------------------------------


def test_bench_runs_and_writes_a_results_table(tmp_path):
    pytest.importorskip("diffusers")
    from sdxl import bench

    results = tmp_path / "RESULTS.md"
    log = tmp_path / "rows.jsonl"
    code = bench.main(["--tiny", "--cpu", "--dtypes", "fp32", "--components", "unet", "--rounds", "1",
                       "--results", str(results), "--json", str(log)])
    assert code == 0
    text = results.read_text()
    assert "| unet | ours | fp32 | eager |" in text and "| unet | diffusers | fp32 | eager |" in text
    assert "ours [eager] / diffusers [eager]" in text and "command: `python bench/bench.py --tiny" in text
    assert len(log.read_text().splitlines()) >= 4


@pytest.mark.slow
def test_bench_product_path_runs_tiny(tmp_path):
    """The product-path section on a miniature file: `sdxl generate` and diffusers' from_single_file as
    child processes, both finish, make the same picture, and the table has both rows."""
    pytest.importorskip("diffusers")
    from sdxl import bench

    results = tmp_path / "RESULTS.md"
    code = bench.main(["--tiny", "--cpu", "--components", "product", "--rounds", "1", "--steps", "2",
                       "--latent", "8", "--threads", "1", "--product-dir", str(tmp_path),
                       "--results", str(results)])
    assert code == 0
    text = results.read_text()
    assert "| product | ours | fp32 | sdxl generate, whole process |" in text
    assert "| product | diffusers | fp32 | from_single_file + pipe(), whole process |" in text
    psnr_db = float(text.split("the two PNGs, 8-bit PSNR ")[1].split(" dB")[0])
    assert psnr_db >= 40.0  # ours reproduces diffusers' txt2img on the same file and seed
    assert not any(tmp_path.glob("sdxl-product-*"))  # the checkpoint is deleted afterwards
