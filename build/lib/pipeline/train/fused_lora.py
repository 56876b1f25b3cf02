"""One autograd node per LoRA projection: ``y = x W^T + b + s (x A^T) B^T``.

peft computes a LoRA layer as separate modules: the base layer (for QLoRA, bitsandbytes' ``Linear4bit``
with its own autograd function and Python checks), ``lora_A``, ``lora_B``, a scale and an add, each a
module call, kernel launch and autograd node. Training a small model on a GPU is bound by that host
work (docs/benchmarks.md: ~0.3 s of host time per micro-batch; the GPU waits on the host for about a
third of the step), so this
module replaces the adapter path of every plain LoRA layer with a single ``torch.autograd.Function``:
the base matmul, the two low-rank matmuls with the scale folded into ``addmm``'s ``alpha``, and a
hand-written backward that re-dequantizes the 4-bit weight instead of saving it. The math is peft's;
only the bookkeeping is fused. Layers peft computes differently (DoRA, dropout, several active
adapters, merged or disabled adapters) keep peft's own forward.
"""

from __future__ import annotations

import types


def _dense_weight(base, dtype):
    """The base layer's weight as a dense ``(out, in)`` tensor in ``dtype``; 4-bit weights are dequantized."""
    weight = base.weight
    state = getattr(weight, "quant_state", None)
    if state is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, state).to(dtype)
    return weight.to(dtype)


def _lora_function():
    import torch

    class FusedLoRA(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, a, b, base, scale):
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            a_, b_ = a.to(dtype), b.to(dtype)
            with torch.autocast(x.device.type, enabled=False):
                w = _dense_weight(base, dtype)
                bias = base.bias.to(dtype) if base.bias is not None else None
                y = torch.addmm(bias, x2, w.t()) if bias is not None else x2 @ w.t()
                xa = x2 @ a_.t()
                y.addmm_(xa, b_.t(), alpha=scale)
            ctx.save_for_backward(x2, xa, a_, b_)
            ctx.base, ctx.scale, ctx.shape, ctx.dtypes = base, scale, x.shape, (x.dtype, a.dtype, b.dtype)
            return y.view(*x.shape[:-1], y.shape[-1])

        @staticmethod
        def backward(ctx, grad):
            x2, xa, a_, b_ = ctx.saved_tensors
            x_dtype, a_dtype, b_dtype = ctx.dtypes
            g = grad.reshape(-1, grad.shape[-1]).to(x2.dtype)
            gb = g @ b_  # (tokens, r): the gradient reaching the low-rank activations, before the scale
            grad_x = grad_a = grad_b = None
            if ctx.needs_input_grad[0]:
                grad_x = g @ _dense_weight(ctx.base, x2.dtype)
                grad_x.addmm_(gb, a_, alpha=ctx.scale)
                grad_x = grad_x.view(ctx.shape).to(x_dtype)
            if ctx.needs_input_grad[1]:
                grad_a = (gb.t() @ x2).mul_(ctx.scale).to(a_dtype)
            if ctx.needs_input_grad[2]:
                grad_b = (g.t() @ xa).mul_(ctx.scale).to(b_dtype)
            return grad_x, grad_a, grad_b, None, None

    return FusedLoRA


def _fusable(layer) -> str | None:
    """The adapter name if ``layer``'s forward is plain LoRA right now, else None (peft's forward then runs)."""
    import torch

    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    if not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return None
    base = layer.get_base_layer()
    if getattr(base.weight, "requires_grad", False) or (base.bias is not None and base.bias.requires_grad):
        return None  # the fused backward gives no gradient to the base weight or bias
    return name


def fuse_lora_layers(model) -> int:
    """Route every peft LoRA ``Linear`` (dense or bitsandbytes 4-bit base) of ``model`` through the fused
    function; returns how many layers were patched. Other layer types are left to peft."""
    import torch
    from peft.tuners.lora import LoraLayer

    fused = _lora_function()
    try:
        import bitsandbytes as bnb

        four_bit = (bnb.nn.Linear4bit,)
    except ImportError:
        four_bit = ()

    def supported(base) -> bool:
        # Exactly nn.Linear or bitsandbytes 4-bit: other Linear subclasses (8-bit, other quantizers) keep
        # their own forward, which this function would not reproduce.
        return type(base) is torch.nn.Linear or isinstance(base, four_bit)

    patched = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or not supported(module.get_base_layer()):
            continue
        if not hasattr(module, "lora_A") or not isinstance(module.lora_A, torch.nn.ModuleDict):
            continue
        peft_forward = type(module).forward

        def forward(self, x, *args, _peft_forward=peft_forward, **kwargs):
            name = None if args or kwargs else _fusable(self)
            if name is None:
                return _peft_forward(self, x, *args, **kwargs)
            return fused.apply(x, self.lora_A[name].weight, self.lora_B[name].weight, self.get_base_layer(),
                               self.scaling[name])

        module.forward = types.MethodType(forward, module)
        patched += 1
    return patched
