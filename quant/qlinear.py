"""The fake-quant linear layer of accllm: integer weights (codes, zero points, fp16 scales) held as a
brevitas ``GroupwiseIntQuantTensor``, and int8 input activations.

``QLinear`` replaces ``nn.Linear`` in the model. Its buffers are exactly what the package stores, so
the torch model and the packed package agree bit for bit; ``weight`` is the dequantized W_hat
(``quant_weight().value``), cached for speed. A layer kept in float (``bits == 0``) keeps its float
weight and may still quantize its inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quantizers import act_fake_quant, act_int, weight_quant_tensor


class QLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, *, bits: int, group: int,
                 codes: torch.Tensor | None = None, zeros: torch.Tensor | None = None,
                 scales: torch.Tensor | None = None, float_weight: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 act_bits: int = 0, act_scheme: str = "per_token"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group = bits, group
        self.act_bits, self.act_scheme = act_bits, act_scheme
        self.act_enabled = True
        self.register_buffer("act_scale", None)
        self.register_buffer("mask", None if mask is None else mask.bool())
        # a bias is kept in fp16 precision, as the package stores it (the accelerator adds it in Q16.16)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.float16).float(), requires_grad=False)
        if bits:
            self.register_buffer("codes", codes.to(torch.uint8))
            self.register_buffer("zeros", zeros.to(torch.uint8))
            self.register_buffer("scales", scales.to(torch.float16))
            self.register_buffer("weight", self.quant_weight().value.detach().float().contiguous())
        else:
            self.register_buffer("weight", float_weight.detach().float().clone())

    @classmethod
    def from_linear(cls, lin: nn.Linear, **kw) -> "QLinear":
        return cls(lin.in_features, lin.out_features, bias=lin.bias, **kw)

    def quant_weight(self):
        """The brevitas GroupwiseIntQuantTensor of the weight (bits > 0 only)."""
        return weight_quant_tensor(self.codes, self.zeros, self.scales, self.bits, self.group)

    def refresh(self) -> None:
        """Recompute the cached W_hat after the integer buffers changed (e.g. after QAT)."""
        if self.bits:
            self.weight = self.quant_weight().value.detach().float().contiguous()

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.act_bits or not self.act_enabled:
            return x
        if self.act_scheme == "per_tensor":
            if self.act_scale is None:
                raise RuntimeError("static per-tensor activation scale not calibrated")
            return act_fake_quant(x, self.act_bits, self.act_scale)
        return act_fake_quant(x, self.act_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quant_input(x), self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def integer_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The integer face of :meth:`forward` (reference for the accelerator): int8 activations ×
        (code − zero) integer products, accumulated per group in int32 (exact), then scaled by
        the fp16 weight scale of each group and the activation scale of each token."""
        if not self.bits:
            raise RuntimeError("integer_forward needs a quantized weight")
        shp = x.shape
        x2 = x.reshape(-1, shp[-1])
        if self.act_bits:
            xq, xs = act_int(x2, self.act_bits, self.act_scale if self.act_scheme == "per_tensor" else None)
            xs = xs.float().expand(x2.shape[0], 1) if xs.dim() else xs.float().reshape(1, 1).expand(x2.shape[0], 1)
        else:
            xq, xs = x2, torch.ones(x2.shape[0], 1)
        n, k, g = self.out_features, self.in_features, self.group
        wi = self.codes.long() - self.zeros.long().repeat_interleave(g, dim=1)          # [N, K] ints
        G = k // g
        if self.act_bits:
            # exact integer dot products per group (int64 here; |sum| < 2^31 for the hardware's int32)
            part = torch.einsum("tgi,ngi->tng", xq.long().reshape(-1, G, g), wi.reshape(n, G, g))
            part = part.double()
        else:
            part = torch.einsum("tgi,ngi->tng", xq.double().reshape(-1, G, g), wi.double().reshape(n, G, g))
        y = (part * self.scales.double()[None]).sum(-1) * xs.double()
        if self.bias is not None:
            y = y + self.bias.double()
        return y.reshape(*shp[:-1], n).to(x.dtype)

    def extra_repr(self) -> str:
        w = f"W{self.bits} g{self.group}" if self.bits else "W float"
        a = f"A{self.act_bits} {self.act_scheme}" if self.act_bits else "A float"
        return f"{self.in_features}->{self.out_features}, {w}, {a}" + (", sparse" if self.mask is not None else "")
