"""Speed switches for our models: fused projections, channels_last, oneDNN linears, fp8 linears, SDPA
backend choice, torch.compile, CUDA graphs and the compile cache.

Nothing here changes what a model computes beyond rounding (fp8 changes it by a measured amount, see
`bench/RESULTS.md`), and nothing changes parameter names: the switches act on the modules in place, swap
modules for ones holding the same Parameters, or wrap them. Two entry points:

    speed_up(unet, text, vae)             # what `sdxl.load` applies by default: only exact switches, in place
    fast_unet = optimize(unet, fused_qkv=True, channels_last=True, compile="default")   # the benchmark's

Where each switch pays off (measured numbers in bench/RESULTS.md):
- fused_qkv: one matmul instead of three for self-attention q/k/v, one instead of two for cross-attention
  k/v (GPU and CPU): each `Attention` is swapped for a `FusedAttention` holding the same Parameters.
- channels_last: NHWC activations. cuDNN and oneDNN convolutions prefer it, and the UNet's transformer
  blocks then read the feature map as [B, H*W, C] tokens without a transposing copy.
- onednn (CPU only): linears through oneDNN instead of the BLAS that PyTorch's CPU build calls (MKL), which
  on AMD CPUs runs float32 matrix products at well under half of oneDNN's rate.
- fp8 (GPU with float8 tensor cores, sm_89+): transformer linears as float8 e4m3 matmuls
  (`torch._scaled_mm`), weights scaled per output row, activations per token.
- sdpa_backend: force one scaled-dot-product-attention kernel ("flash", "cudnn", "efficient", "math"), or
  an order of preference.
- compile: `torch.compile` with static shapes and no graph breaks (fullgraph=True).
- `CUDAGraphRunner`: capture a whole UNet call (or a text encoder call) once and replay it each step.
- `enable_compile_cache`: keep Inductor's compiled kernels on disk so a second start skips compilation.
- `half_precision_vae`: a bfloat16 VAE decode, which cannot overflow the way float16 does.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_map

from sdxl.models.unet import Attention, BasicTransformerBlock, ResBlock

# ---------------------------------------------------------------------------------------------------------
# What the machine can do
# ---------------------------------------------------------------------------------------------------------


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_supports_bf16() -> bool:
    """True when bfloat16 matmuls run natively on this CPU (AVX512-BF16 or AMX), not emulated.

    Emulated bf16 is slower than float32, so the benchmark only runs a bf16 CPU mode where this holds.
    """
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    flags = _cpu_flags()
    return native and (not flags or bool(flags & {"avx512_bf16", "amx_bf16"}))


@functools.cache
def onednn_linear_available() -> bool:
    """Whether PyTorch exposes oneDNN's linear (`torch.ops.mkldnn._linear_pointwise`) and it computes a
    correct product here. It is an internal op (Inductor's CPU backend emits it), so check it once."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        x = torch.randn(3, 8)
        w = torch.randn(5, 8)
        b = torch.randn(5)
        out = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    except (AttributeError, RuntimeError):
        return False
    return bool(torch.allclose(out, F.linear(x, w, b), rtol=1e-4, atol=1e-5))


def fp8_supported(device: torch.device | str) -> bool:
    """float8 matmuls with per-row scales: CUDA compute capability 8.9 (Ada) / 9.0 (Hopper) and newer, or
    the CPU implementation of `torch._scaled_mm` (slow: used for tests only)."""
    device = torch.device(device)
    if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        return False
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)
    if device.type == "cpu":
        try:
            a = torch.ones(16, 16).to(torch.float8_e4m3fn)
            torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16),
                             out_dtype=torch.bfloat16)
        except (RuntimeError, NotImplementedError):
            return False
        return True
    return False


# ---------------------------------------------------------------------------------------------------------
# oneDNN linears (CPU)
# ---------------------------------------------------------------------------------------------------------


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight.T + bias through oneDNN when that is possible (CPU, float32/bfloat16, no autograd),
    through F.linear otherwise. Same result up to float rounding (a different summation order)."""
    usable = (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and weight.dtype == x.dtype
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )
    if usable:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class OneDNNLinear(nn.Linear):
    """nn.Linear whose forward calls `onednn_linear`. Built around an existing layer's Parameters (the same
    tensors, so the state dict, optimizers and LoRA see nothing new)."""

    @classmethod
    def wrap(cls, layer: nn.Linear) -> OneDNNLinear:
        return _linear_over(cls, layer)

    def forward(self, x: Tensor) -> Tensor:
        return onednn_linear(x, self.weight, self.bias)


def _shell(cls: type[nn.Module]) -> nn.Module:
    """An empty instance of `cls`: nn.Module's bookkeeping only, no parameters allocated or initialised
    (building on the meta device still runs every layer's random init, ~1 s for the UNet's modules)."""
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    return module


def _linear_over(cls: type[nn.Linear], layer: nn.Linear) -> nn.Linear:
    """A `cls` (nn.Linear or a subclass) holding `layer`'s Parameters."""
    new = _shell(cls)
    new.in_features, new.out_features = layer.in_features, layer.out_features
    new.weight, new.bias = layer.weight, layer.bias
    return new.train(layer.training)


def _replace_children(model: nn.Module, make: Callable[[str, nn.Module], nn.Module | None]) -> int:
    """Replace every descendant module m (full name n) by make(n, m) when that returns a module."""
    count = 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            new = make(full, child)
            if new is not None:
                setattr(parent, child_name, new)
                count += 1
    return count


def use_onednn_linears(model: nn.Module, enabled: bool = True) -> int:
    """Route every nn.Linear of `model` (and the fused projections of `FusedAttention`) through oneDNN, or,
    with enabled=False, back through F.linear. Returns how many layers were switched.

    Does nothing where oneDNN's linear is unavailable. The Parameters are shared, not copied.
    """
    if enabled and not onednn_linear_available():
        return 0

    def make(name: str, m: nn.Module) -> nn.Module | None:
        if enabled and type(m) is nn.Linear:
            return OneDNNLinear.wrap(m)
        if not enabled and type(m) is OneDNNLinear:
            return _linear_over(nn.Linear, m)
        return None

    count = _replace_children(model, make)
    for m in model.modules():
        if isinstance(m, FusedAttention):
            m.project_fn = onednn_linear if enabled else F.linear
    return count


# ---------------------------------------------------------------------------------------------------------
# Fused projections: a module swap
# ---------------------------------------------------------------------------------------------------------


class FusedAttention(Attention):
    """`Attention` that runs the projections reading the same input as ONE matmul: [to_q; to_k; to_v] for
    self-attention (x feeds all three), [to_k; to_v] for cross-attention (the text context feeds both).
    One large matmul keeps a GPU (or the CPU's vector units) busier than three small ones and reads its
    input once.

    Built by `fuse_qkv` from an existing `Attention`, whose child modules it takes over: the same to_q /
    to_k / to_v / to_out objects and Parameters, so the state dict, LoRA matching and hooks see nothing
    new. The weights are copied once, back to back, into `fused_weight` (a non-persistent buffer), and each
    Parameter's storage becomes a view of its rows: no second copy and no per-call concatenation, and
    in-place updates of the Parameters (load_state_dict, a fused LoRA, an optimizer step) reach the matrix.

    What gives a Parameter new storage (`.to()`, deepcopy, `load_state_dict(assign=True)`) breaks the views;
    the eager forward notices (one pointer comparison per weight) and lays the matrix out again. `_apply`
    drops the matrix before a conversion so that `.to()` does not carry it as a second copy. Under
    torch.compile the layout is not checked (prepare it before compiling: `lay_out()`).

    `fused_qkv = False` runs the three Linear modules instead; LoRA forward hooks on to_q/k/v switch it off
    while they are attached (`sdxl.weights.lora`), since the one matmul would bypass them. `project_fn` is
    the matmul of the fused path (`onednn_linear` after `use_onednn_linears`); `sdpa_backends` restricts
    the attention kernel (None = PyTorch's choice).
    """

    @classmethod
    def from_attention(cls, attn: Attention) -> FusedAttention:
        new = _take_over(cls, attn)
        new.fused_qkv = True
        new.project_fn = onednn_linear if isinstance(attn.to_q, OneDNNLinear) else F.linear
        new.sdpa_backends = None
        new.register_buffer("fused_weight", None, persistent=False)
        new._row_ptrs = ()
        new.lay_out()
        return new

    def to_plain(self) -> Attention:
        """The literal `Attention` over the same child modules (the Parameters keep their values)."""
        return _take_over(Attention, self)

    def _shared_input_layers(self) -> list[nn.Linear]:
        if self.is_cross_attention:
            return [self.to_k, self.to_v]
        return [self.to_q, self.to_k, self.to_v]

    def lay_out(self) -> None:
        """Copy the shared-input weights back to back into `fused_weight`; the Parameters become its rows."""
        layers = self._shared_input_layers()
        # a normal tensor even inside inference_mode: the Parameters must stay usable outside it
        with torch.inference_mode(False), torch.no_grad():
            fused = torch.cat([layer.weight.detach() for layer in layers], dim=0)
            row = 0
            for layer in layers:
                rows = layer.weight.shape[0]
                layer.weight.data = fused[row:row + rows]  # the same Parameter object, now a view
                row += rows
        self.fused_weight = fused
        self._row_ptrs = tuple(layer.weight.data_ptr() for layer in layers)

    def views_intact(self) -> bool:
        """Whether every shared-input Parameter is still the matching rows of `fused_weight`."""
        layers = self._shared_input_layers()
        return self.fused_weight is not None and all(
            layer.weight.data_ptr() == ptr for layer, ptr in zip(layers, self._row_ptrs, strict=True))

    def _apply(self, fn, recurse: bool = True):
        self.fused_weight = None  # converted Parameters get storage of their own: lay out again afterwards
        return super()._apply(fn, recurse)

    def _fused_matrix(self) -> Tensor:
        layers = self._shared_input_layers()
        if torch.is_grad_enabled() and layers[0].weight.requires_grad:
            return torch.cat([layer.weight for layer in layers], dim=0)  # differentiable (training)
        if torch.compiler.is_compiling():
            if self.fused_weight is None:  # moved after fusing and never run eagerly since: concatenate
                return torch.cat([layer.weight for layer in layers], dim=0)
        elif not self.views_intact():
            self.lay_out()
        return self.fused_weight

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if not self.fused_qkv:
            return super().forward(x, context)
        if self.is_cross_attention:
            q = self.to_q(x)
            k, v = self.project_fn(context, self._fused_matrix()).chunk(2, dim=-1)
        else:
            q, k, v = self.project_fn(x, self._fused_matrix()).chunk(3, dim=-1)
        return self.attend(q, k, v)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.sdpa_backends is None:
            return super().attend(q, k, v)
        with sdpa_kernel(self.sdpa_backends, set_priority=len(self.sdpa_backends) > 1):
            return super().attend(q, k, v)


def _take_over(cls: type[Attention], attn: Attention) -> Attention:
    """A `cls` (Attention or FusedAttention) with `attn`'s sizes and child modules (the same objects)."""
    new = _shell(cls)
    new.heads, new.dim_head, new.is_cross_attention = attn.heads, attn.dim_head, attn.is_cross_attention
    new.to_q, new.to_k, new.to_v, new.to_out = attn.to_q, attn.to_k, attn.to_v, attn.to_out
    return new.train(attn.training)


def fuse_qkv(model: nn.Module) -> int:
    """Swap every `Attention` in `model` for a `FusedAttention` over the same Parameters; returns how many."""
    return _replace_children(
        model, lambda name, m: FusedAttention.from_attention(m) if type(m) is Attention else None)


def unfuse_qkv(model: nn.Module) -> int:
    """Swap every `FusedAttention` back to a plain `Attention` (same Parameters); returns the count."""
    return _replace_children(model, lambda name, m: m.to_plain() if isinstance(m, FusedAttention) else None)


def is_fused(model: nn.Module) -> bool:
    return any(isinstance(m, FusedAttention) for m in model.modules())


# ---------------------------------------------------------------------------------------------------------
# fp8 linears
# ---------------------------------------------------------------------------------------------------------

E4M3_MAX = 448.0  # the largest finite float8 e4m3fn value


def quantize_fp8_rows(t: Tensor) -> tuple[Tensor, Tensor]:
    """Scale each row of a 2-D tensor so its largest magnitude lands on 448, then cast to float8 e4m3.

    Returns (values [R, C] float8, scales [R, 1] float32) with t ~= values * scales. Per-row (per output
    channel / per token) scales keep one large row from flattening the precision of all the others.
    """
    t = t.float()
    scale = t.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
    return (t / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


class Float8Linear(nn.Module):
    """A Linear computed as a float8 matmul: W stored as float8 e4m3 with one float32 scale per output row;
    the input quantised per row (token) on every call; products accumulated in float32 by the tensor cores
    (`torch._scaled_mm`) and returned in the input's dtype (bfloat16).

    Inference only (no gradient). Keeps the layer's names: `weight` (now float8) and `bias`, plus
    `weight_scale`. Hopper's float8 tensor cores have twice the peak rate of its bf16 ones and the weights
    take half the memory; the quality cost is measured in the benchmark (image PSNR against float32).
    """

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__()
        w8, scale = quantize_fp8_rows(weight.detach())
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.register_buffer("weight", w8)
        self.register_buffer("weight_scale", scale.reshape(1, -1))  # [1, out], as _scaled_mm wants it
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> Float8Linear:
        return cls(layer.weight, layer.bias)

    def _apply(self, fn, recurse: bool = True):
        """`model.to(torch.bfloat16)` must not turn the float8 weights into bf16 (float8 is a floating-point
        dtype too, so it would): keep their values and scales, follow only the device."""
        weight, scale = self.weight, self.weight_scale
        super()._apply(fn, recurse)
        if self.weight.dtype != weight.dtype:
            self.weight = weight.to(self.weight.device)
        if self.weight_scale.dtype != scale.dtype:
            self.weight_scale = scale.to(self.weight_scale.device)
        return self

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x8, x_scale = quantize_fp8_rows(x.reshape(-1, self.in_features))
        # _scaled_mm wants the second operand column-major: the transpose of a row-major [out, in] matrix
        out = torch._scaled_mm(x8, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale,
                               out_dtype=torch.bfloat16)
        out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float8_e4m3fn"


def _in_transformer(name: str) -> bool:
    """The UNet's transformer linears: proj_in/proj_out and everything in transformer_blocks."""
    return ".transformer_blocks." in name or name.endswith((".proj_in", ".proj_out"))


def use_fp8_linears(model: nn.Module, include: Callable[[str], bool] = _in_transformer,
                    min_features: int = 16) -> int:
    """Replace the selected nn.Linear layers of `model` by `Float8Linear` (in place); returns the count.

    By default: every linear of the UNet's transformers (about 3/4 of the UNet's matmul work at 1024^2);
    the convolutions and the small embedding MLPs stay in bf16. Fused attention projections are swapped
    back to plain `Attention` first (their q/k/v Parameters are replaced here); under torch.compile the
    repeated quantisation of the shared input is computed once (common-subexpression elimination).
    Both matrix sides must be multiples of 16 for the float8 kernels; smaller or odd layers are skipped.
    """
    unfuse_qkv(model)

    def make(name: str, m: nn.Module) -> nn.Module | None:
        if not isinstance(m, nn.Linear) or not include(name):
            return None
        if m.in_features % 16 or m.out_features % 16 or min(m.in_features, m.out_features) < min_features:
            return None
        return Float8Linear.from_linear(m)

    return _replace_children(model, make)


# ---------------------------------------------------------------------------------------------------------
# Scaled-dot-product attention backend
# ---------------------------------------------------------------------------------------------------------

SDPA_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}


def sdpa_backends(name: str | Iterable[str]) -> list:
    """["cudnn", "flash"] -> the torch.nn.attention.SDPBackend members, in that order of preference."""
    names = [name] if isinstance(name, str) else list(name)
    out = []
    for n in names:
        if n not in SDPA_BACKENDS:
            raise ValueError(f"unknown SDPA backend {n!r}; choose from {sorted(SDPA_BACKENDS)}")
        out.append(getattr(SDPBackend, SDPA_BACKENDS[n]))
    return out


class WithSDPABackend(nn.Module):
    """Run a module with scaled_dot_product_attention restricted to the given kernels (in that order).

    Under torch.compile the choice is made while tracing and baked into the compiled graph.
    """

    def __init__(self, module: nn.Module, backends: str | Iterable[str]):
        super().__init__()
        self.module = module
        self.backend_names = [backends] if isinstance(backends, str) else list(backends)
        self._backends = sdpa_backends(self.backend_names)

    def forward(self, *args, **kwargs):
        with sdpa_kernel(self._backends, set_priority=len(self._backends) > 1):
            return self.module(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# torch.compile and its cache
# ---------------------------------------------------------------------------------------------------------


def enable_compile_cache(cache_dir: str | os.PathLike | None = None) -> Path:
    """Keep Inductor's compiled graphs and autotuning results on disk, so that the next process compiling
    the same model (same shapes, same torch) loads kernels instead of generating them.

    `cache_dir` defaults to $TORCHINDUCTOR_CACHE_DIR, else ~/.cache/sdxl/inductor. Call before compiling.
    """
    default = Path.home() / ".cache" / "sdxl" / "inductor"
    path = Path(cache_dir or os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default)
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    import torch._inductor.config as inductor_config  # lazy: the compiler stack (~1 s) only when compiling

    inductor_config.fx_graph_cache = True
    if hasattr(inductor_config, "autotune_local_cache"):
        inductor_config.autotune_local_cache = True
    return path


def save_compile_artifacts(path: str | os.PathLike) -> bool:
    """Write everything torch.compile produced in this process to one portable file (torch >= 2.7's
    "mega-cache"); `load_compile_artifacts` in a new process makes its compile a cache hit. False when
    this torch has no such API or nothing was compiled."""
    save = getattr(torch.compiler, "save_cache_artifacts", None)
    if save is None:
        return False
    result = save()
    if result is None:
        return False
    data, _info = result
    Path(path).write_bytes(data)
    return True


def load_compile_artifacts(path: str | os.PathLike) -> bool:
    load = getattr(torch.compiler, "load_cache_artifacts", None)
    p = Path(path)
    if load is None or not p.is_file():
        return False
    load(p.read_bytes())
    return True


def configure_inductor(device_type: str) -> None:
    """Inductor settings that help these convolution + attention networks.

    - conv_1x1_as_mm: 1x1 convolutions (UNet skip connections, VAE projections) as matmuls, which Inductor
      can fuse with their neighbours.
    - recompile limit raised: regional compilation compiles one code object for many block shapes.
    - hooks guarded: Dynamo by default ignores forward hooks added after compiling, so a LoRA applied by
      hooks (`sdxl.weights.lora.apply`) would silently not run; guarding them recompiles instead.
    """
    import torch._dynamo.config as dynamo_config  # lazy: the compiler stack (~1 s) only when compiling
    import torch._inductor.config as inductor_config  # lazy: Inductor loads only when compiling

    inductor_config.conv_1x1_as_mm = True
    dynamo_config.skip_nnmodule_hook_guards = False
    if hasattr(dynamo_config, "recompile_limit"):
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    else:  # older name
        dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, 64)
    if device_type == "cuda":
        torch.backends.cudnn.benchmark = True  # pick the fastest convolution algorithm per shape, once


def compile_module(module: nn.Module, mode: str = "default", fullgraph: bool = True,
                   dynamic: bool = False) -> nn.Module:
    """torch.compile with static shapes: every distinct input shape gets its own specialised kernels
    (a sampling run uses one shape, so nothing recompiles); fullgraph=True makes any graph break an error.
    mode: "default", "max-autotune-no-cudagraphs", "reduce-overhead" (adds CUDA graphs), "max-autotune"."""
    return torch.compile(module, mode=mode, fullgraph=fullgraph, dynamic=dynamic)


def compile_regions(model: nn.Module, classes: tuple[type, ...], mode: str = "default",
                    dynamic: bool = False) -> int:
    """Regional compilation: compile each block of the given classes in place (`module.compile()`).

    Blocks of one class share their compiled code (same shapes), so compiling takes a fraction of a
    whole-model compile, at the price of no fusion across block boundaries. Returns the block count.
    """
    count = 0
    for m in model.modules():
        if isinstance(m, classes):
            m.compile(mode=mode, fullgraph=True, dynamic=dynamic)
            count += 1
    return count


# ---------------------------------------------------------------------------------------------------------
# CUDA graphs
# ---------------------------------------------------------------------------------------------------------


class CUDAGraphRunner:
    """Capture `fn(*tensors)` as one CUDA graph and replay it for later calls of the same shapes.

    A sampling step launches thousands of small kernels; replaying a graph launches them all in one go, so
    the GPU never waits for Python. Inputs are copied into the graph's own (static) buffers on each call;
    the output comes back as a fresh copy unless `copy_output=False` (then it is the graph's buffer, which
    the next call overwrites). Non-tensor arguments are baked in at capture; new shapes, dtypes or non-tensor
    values capture a new graph. On the CPU (or with any non-CUDA tensor) it simply calls `fn`.

    The wrapped function must be capturable: no host synchronisation (.item(), printing values, data-
    dependent shapes), no CPU tensors created on the fly. Our UNet and text towers qualify when timesteps
    are passed as CUDA tensors.
    """

    def __init__(self, fn: Callable[..., Any], warmup: int = 2, copy_output: bool = True):
        self.fn = fn
        self.warmup = warmup
        self.copy_output = copy_output
        self.graph = None
        self._key = None
        self._static_inputs: list[Any] = []
        self._static_output: Any = None
        self.captures = 0

    @staticmethod
    def _signature(args: tuple) -> tuple:
        return tuple(
            (tuple(a.shape), a.dtype, a.device, a.stride()) if isinstance(a, Tensor) else ("const", a)
            for a in args
        )

    def _capture(self, args: tuple, key: tuple) -> None:
        self._static_inputs = [a.clone() if isinstance(a, Tensor) else a for a in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph: lazy init, cuDNN/cuBLAS autotuning
            for _ in range(self.warmup):
                self.fn(*self._static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._static_output = self.fn(*self._static_inputs)
        self.graph = graph
        self._key = key
        self.captures += 1

    def __call__(self, *args):
        tensors = [a for a in args if isinstance(a, Tensor)]
        if not tensors or not all(t.is_cuda for t in tensors):
            return self.fn(*args)
        key = self._signature(args)
        if key != self._key:
            self._capture(args, key)
        for buf, a in zip(self._static_inputs, args):
            if isinstance(a, Tensor):
                buf.copy_(a)
        self.graph.replay()
        if self.copy_output:
            return tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, self._static_output)
        return self._static_output


# ---------------------------------------------------------------------------------------------------------
# The product's default: the exact switches, applied by `sdxl.load`
# ---------------------------------------------------------------------------------------------------------


def best_sdpa_backends(device: torch.device | str) -> list[str] | None:
    """The attention kernels to prefer on `device`, or None for PyTorch's own order.

    CUDA, compute capability 9.0 and newer (Hopper, Blackwell): cuDNN's fused attention first, then flash
    (PyTorch 2.5's release notes give cuDNN up to 75% over FlashAttention-2 on H100; PyTorch's default order
    puts it after flash). Elsewhere PyTorch's choice stands: on a CPU there is one fused kernel (flash for
    CPU) and it is already the default.
    """
    device = torch.device(device)
    cuda = device.type == "cuda" and torch.cuda.is_available()
    if cuda and torch.cuda.get_device_capability(device) >= (9, 0):
        return ["cudnn", "flash", "efficient", "math"]
    return None


def speed_up(unet: nn.Module | None = None, text: nn.Module | None = None, vae: nn.Module | None = None,
             *, exact: bool = True, compile: bool = False,
             cache_dir: str | os.PathLike | None = None) -> list[str]:
    """Apply the switches that change nothing but float rounding, in place; returns what was applied.

    exact=True: UNet: fused projections (`fuse_qkv`), channels_last, oneDNN linears on a CPU (eager only),
    the SDPA kernel order of `best_sdpa_backends`. Text towers: oneDNN linears on a CPU. VAE: channels_last.
    compile=True (with or without `exact`): `torch.compile` of the UNet in place (fullgraph, static shapes,
    `module.compile()`, so the UNet object and its parameters stay what callers hold) over an Inductor
    cache on disk (`enable_compile_cache`), so a second process start loads the kernels.
    The modules keep their parameter names and tensors: LoRA, state_dict and offloading work as before.
    """
    applied: list[str] = []
    if unet is not None and exact:
        device = next(unet.parameters()).device
        if fuse_qkv(unet):
            applied.append("fused-qkv")
        unet.use_channels_last(True)
        applied.append("channels-last")
        if device.type == "cpu" and not compile and use_onednn_linears(unet):
            applied.append("onednn")
        backends = best_sdpa_backends(device)
        if backends:
            chosen = sdpa_backends(backends)
            for m in unet.modules():
                if isinstance(m, FusedAttention):
                    m.sdpa_backends = chosen
            applied.append("sdpa=" + "/".join(backends))
    if unet is not None and compile:
        enable_compile_cache(cache_dir)
        configure_inductor(next(unet.parameters()).device.type)
        unet.compile(fullgraph=True, dynamic=False)
        applied.append("compile")
    if not exact:
        return applied
    first = next(text.parameters(), None) if text is not None else None  # a file may have no text towers
    if first is not None and first.device.type == "cpu" and use_onednn_linears(text):
        applied.append("text-onednn")
    if vae is not None:
        vae.to(memory_format=torch.channels_last)
        applied.append("vae-channels-last")
    return applied


# ---------------------------------------------------------------------------------------------------------
# One call for the UNet
# ---------------------------------------------------------------------------------------------------------


def optimize(
    unet: nn.Module,
    *,
    fused_qkv: bool = True,
    channels_last: bool = True,
    onednn: bool | None = None,
    fp8: bool = False,
    sdpa_backend: str | Iterable[str] | None = None,
    compile: str | bool | None = None,
    fullgraph: bool = True,
    dynamic: bool = False,
) -> nn.Module:
    """Apply the speed switches to our UNet (in place) and return what to call: the UNet itself, or a
    wrapper / compiled module around it. Parameter names and values stay the same (except with fp8).

    onednn: None = on for an eager CPU model where oneDNN's linear exists (float32 gains most), False = off.
      Not combined with compile: Inductor lowers oneDNN linears only for frozen weights, and picks its own
      matmul kernels anyway.
    compile: None/False (eager), True or a torch.compile mode ("default", "reduce-overhead", ...), or
      "regional" (compile each ResBlock / transformer block on its own: much faster to compile).
    The CUDA-graph runner is separate (`CUDAGraphRunner`), since it owns input buffers.
    """
    device = next(unet.parameters()).device
    if fused_qkv and not fp8:
        fuse_qkv(unet)
    if channels_last:
        unet.use_channels_last(True)
    if onednn is None:
        onednn = device.type == "cpu" and not compile
    if onednn and compile:
        raise ValueError("onednn linears and torch.compile do not combine (see the docstring)")
    if onednn and device.type == "cpu":
        use_onednn_linears(unet)
    if fp8:
        if not fp8_supported(device):
            raise RuntimeError(f"float8 matmuls are not supported on {device}")
        use_fp8_linears(unet)
    model: nn.Module = unet
    if sdpa_backend:
        model = WithSDPABackend(model, sdpa_backend)
    if compile:
        configure_inductor(device.type)
        if compile == "regional":
            compile_regions(unet, (ResBlock, BasicTransformerBlock), dynamic=dynamic)
        else:
            mode = "default" if compile is True else str(compile)
            model = compile_module(model, mode=mode, fullgraph=fullgraph, dynamic=dynamic)
    return model


# ---------------------------------------------------------------------------------------------------------
# VAE in half precision that cannot overflow
# ---------------------------------------------------------------------------------------------------------


def half_precision_vae(vae: nn.Module, channels_last: bool = True) -> nn.Module:
    """Put the VAE in bfloat16 (and NHWC) for decoding.

    The SDXL VAE's decoder activations exceed float16's largest value (65504) and turn into Inf/NaN (black
    images). bfloat16 has float32's exponent range (up to ~3.4e38), so it cannot overflow where float32
    does not, at half the memory traffic of float32; it keeps 8 bits of mantissa (an error of ~0.4% per
    value, invisible after 8-bit quantisation of the image; measured as PSNR in the benchmark).
    """
    vae.to(torch.bfloat16)
    if channels_last:
        vae.to(memory_format=torch.channels_last)
    return vae
