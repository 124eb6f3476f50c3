"""Cycle model of the accelerator (UNVALIDATED until the RTL issues measure cycles against it).

Per instruction, from the hardware parameters (hw/config.py):

* weight streaming: every port delivers ``port_bytes`` per cycle at ``hbm_efficiency`` of its peak,
  capped by the HBM itself: the U280's 32 pseudo-channels peak at 460.8 GB/s (256 bits at 450 MHz
  each), so ports x width x clock above that gives nothing. A linear layer's bytes are split evenly
  over the ports (hw/memmap.py row records), so its streaming time is bytes_per_port / beat rate;
  each burst stream pays ``hbm_latency_cycles`` once (outstanding reads hide the rest when
  ``outstanding_reads * burst_beats >= latency``, else the stream is latency-bound).
* MAC array: ``mac_rows`` x ``mac_lanes`` weight positions per cycle (2:4: kept MACs = half the
  positions; the array skips pruned positions, so a 2:4 row costs K/2 lane slots); matrix-matrix
  (prefill) multiplies that work by the tokens of the block, with weights streamed once per block.
  A linear layer takes max(stream, compute) + pipeline fill (latency + log2 adder tree + 8).
* SFU: ``sfu_lanes`` (= mac_lanes) elements per cycle per pass; RMSNorm 2 passes, SiLU x gate 1,
  quantize 2 (max, then scale); + 32 cycles per reciprocal/isqrt.
* attention: per token, per KV head, the kept S + W slots stream from HBM (K and V, 4-bit + group
  words) over the control port(s) — modelled at the same per-port rate over ``kv_ports`` ports — and the
  score / P x V work runs on the MAC array at one slot per row per cycle; softmax 2 passes.
* lm_head: like any linear layer (8-bit); embedding gather: one row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from hw import isa
from hw.config import HWConfig

HBM_PEAK_BYTES_PER_S = 460.8e9      # U280: 32 pseudo-channels x 256 bit x 450 MHz
FILL = 8
RECIP_CYCLES = 32


@dataclass
class CycleModel:
    hw: HWConfig
    kv_ports: int | None = None

    @property
    def bytes_per_cycle(self) -> float:
        """Achievable weight bytes per kernel cycle over all ports (HBM cap and efficiency applied)."""
        port_peak = self.hw.weight_ports * self.hw.port_bytes * self.hw.clock_mhz * 1e6
        peak = min(port_peak, HBM_PEAK_BYTES_PER_S * self.hw.weight_ports / 32)
        return peak * self.hw.hbm_efficiency / (self.hw.clock_mhz * 1e6)

    def stream_cycles(self, nbytes: float) -> float:
        if nbytes <= 0:
            return 0.0
        hw = self.hw
        in_flight = hw.outstanding_reads * hw.burst_beats
        lat_bound = 1.0 if in_flight >= hw.hbm_latency_cycles else in_flight / hw.hbm_latency_cycles
        return nbytes / (self.bytes_per_cycle * lat_bound) + hw.hbm_latency_cycles

    def linear_bytes(self, N: int, K: int, bits: int, group: int, sparse: bool) -> float:
        ng = K // group
        rec = 1 + ng * (2 if self.hw.scale_bits > 8 else 1) + math.ceil(ng * bits / 8) \
            + (math.ceil(K // 4 * 3 / 8) if sparse else 0) + math.ceil((K // 2 if sparse else K) * bits / 8)
        rows = math.ceil(N / self.hw.weight_ports) * self.hw.weight_ports
        return rows * rec + 64 * self.hw.weight_ports

    def linear_cycles(self, N, K, bits, group, sparse, T=1) -> float:
        hw = self.hw
        pos = K // 2 if sparse else K
        compute = math.ceil(N / hw.mac_rows) * math.ceil(pos / hw.mac_lanes) * T
        stream = self.stream_cycles(self.linear_bytes(N, K, bits, group, sparse))
        fill = math.ceil(math.log2(max(hw.mac_lanes, 2))) + FILL + hw.hbm_latency_cycles
        return max(compute + fill, stream) + ng_overhead(N, hw)

    def sfu_cycles(self, D: int, passes: int, T: int = 1) -> float:
        return T * (passes * math.ceil(D / self.hw.mac_lanes) + RECIP_CYCLES + FILL)

    def kv_bytes_per_token(self, kv_heads: int, head_dim: int, kept: int, vgroup: int) -> float:
        return kv_heads * kept * (head_dim // 2 + head_dim // 2 + 4 * (head_dim // vgroup))

    def attn_cycles(self, heads, kv_heads, head_dim, kept, vgroup=64, T=1) -> float:
        hw = self.hw
        nbytes = self.kv_bytes_per_token(kv_heads, head_dim, kept, vgroup)
        stream = self.stream_cycles(nbytes)
        work = heads * (2 * math.ceil(kept / hw.mac_rows) * math.ceil(head_dim / hw.mac_lanes)
                        + 2 * math.ceil(kept / hw.mac_lanes) + RECIP_CYCLES)
        rope = 2 * math.ceil((heads + kv_heads) * head_dim / hw.mac_lanes)
        return T * (max(stream, work) + rope + FILL)

    # used by the functional model: cycles of one executed instruction
    def instr_cycles(self, ins, info: dict, T: int) -> int:
        k = info.get("kind")
        if k is None or k == "skip":
            return 1
        if k == "matmul":
            return int(self.linear_cycles(info["N"], info["K"], info["bits"], info["group"], info["sparse"],
                                          info.get("rows", T)))
        if k == "sfu":
            passes = {isa.RMSNORM: 4, isa.QUANT: 2, isa.SILUMUL: 3, isa.ADD: 1}.get(ins.op, 2)
            return int(self.sfu_cycles(info["D"], passes, T))
        if k == "attn":
            return int(self.attn_cycles(info["heads"], info["kv_heads"], info["head_dim"], info["kept"], T=T))
        if k == "embed":
            return int(self.stream_cycles(info["D"] * 4) * T)
        if k == "argmax":
            return int(math.ceil(info["V"] / self.hw.mac_lanes) + FILL)
        return 1


def ng_overhead(N: int, hw: HWConfig) -> float:
    """Row-record switch cost: one cycle per row group handed to the array (scales/zeros load)."""
    return math.ceil(N / hw.mac_rows)
