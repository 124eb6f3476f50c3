"""Cycle models of the accelerator.

``CycleModel`` is the *target* architecture (prefetch across instructions, attention and SFU work on
the MAC array's lanes): a projection that no RTL implements yet, so it is not validated.
``RtlCycleModel`` counts the RTL *as built* (hw/rtl): it is checked against the kernel's cycle
register (`accllm bench rtl`: tiny 0.998, SmolLM2-135M 0.991 of measured on sim-small; tests hold it
within 10 %). The notes below describe the target model; RtlCycleModel documents its own terms.

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
  words). The KV cache is striped over the weight ports (KV head h on port h % P), so the stream runs
  at min(kv_heads, P) / P of the weight rate; the score / P x V work runs on the MAC array at one slot
  per row per cycle; softmax 2 passes.
* lm_head: like any linear layer (8-bit); embedding gather: one row.
* SpAtten (recipes with token_keep / head_keep < 1): ATTN reads only the alive tokens of the alive KV
  heads, and reads + writes back the layer's token importance (8 bytes per slot each way) and reads its
  pruned flags (1 byte per slot), all on weights0 (``SPATTEN_STATE_BYTES`` per slot); TOPK streams every
  layer's state (9 bytes per slot, 9 per head) and runs quick-select on ``TOPK_LANES`` comparators:
  about 4 scans of the alive candidates per layer (the expected work of quick-select is ~2 n
  comparisons for the partitions plus the pivot / output scans).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from hw import isa
from hw.config import HWConfig
from hw.memmap import RowRecord

HBM_PEAK_BYTES_PER_S = 460.8e9      # U280: 32 pseudo-channels x 256 bit x 450 MHz
FILL = 8
RECIP_CYCLES = 32
ISSUE = 4            # instruction fetch/decode/dispatch cycles not hidden behind the previous instruction
SPATTEN_STATE_BYTES = 17   # per slot and layer in ATTN: importance read + write (2 x 8) and the pruned flag (1)
TOPK_LANES = 16            # comparisons per cycle of the target top-k engine
TOPK_SCANS = 4             # scans of the alive candidates per layer (expected quick-select work)


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
        rec = RowRecord(K, bits, group, sparse, self.hw.scale_bits).size     # sections padded as packed
        rows = math.ceil(N / self.hw.weight_ports) * self.hw.weight_ports
        return rows * rec + 64 * self.hw.weight_ports

    def linear_parts(self, N, K, bits, group, sparse, T=1) -> tuple[float, float]:
        """(stream cycles without latency, compute cycles incl. adder-tree fill) of one linear layer."""
        hw = self.hw
        pos = K // 2 if sparse else K
        compute = math.ceil(N / hw.mac_rows) * math.ceil(pos / hw.mac_lanes) * T + ng_overhead(N, hw) \
            + math.ceil(math.log2(max(hw.mac_lanes, 2))) + FILL
        stream = self.stream_cycles(self.linear_bytes(N, K, bits, group, sparse)) - hw.hbm_latency_cycles
        return stream, compute

    def linear_cycles(self, N, K, bits, group, sparse, T=1) -> float:
        """Cycles of one linear layer on its own (no overlap with neighbours): latency + max(parts)."""
        s, c = self.linear_parts(N, K, bits, group, sparse, T)
        return self.hw.hbm_latency_cycles + max(s, c)

    def overlapped(self, parts: list[tuple[float, float]]) -> float:
        """Cycles of a run of instructions whose weight/KV streams the DMA prefetches across instruction
        boundaries (prefetch FIFO per port, see docs/architecture.md): the stream and the compute
        pipelines each run back to back, plus one HBM latency and ISSUE cycles per instruction."""
        if not parts:
            return 0.0
        return max(sum(p[0] for p in parts), sum(p[1] for p in parts)) + self.hw.hbm_latency_cycles \
            + ISSUE * len(parts)

    def sfu_cycles(self, D: int, passes: int, T: int = 1) -> float:
        return T * (passes * math.ceil(D / self.hw.mac_lanes) + RECIP_CYCLES + FILL)

    def kv_bytes_per_token(self, kv_heads: int, head_dim: int, kept: int, vgroup: int) -> float:
        from hw.memmap import kv_layout
        lay = kv_layout(1, 1, head_dim, 1, vgroup)
        return kv_heads * kept * (lay["k_slot"] + lay["v_slot"])

    def attn_parts(self, heads, kv_heads, head_dim, kept, vgroup=64, T=1, spatten_slots=0) -> tuple[float, float]:
        """(stream, compute): KV bytes of the kept slots; scores and P x V on the MAC array (one slot per
        row, mac_lanes channels per cycle), softmax 2 passes, one reciprocal per head, RoPE. With SpAtten,
        *kept* / *heads* / *kv_heads* are what is alive, and the importance state of *spatten_slots* slots
        streams from weights0 (one port)."""
        hw = self.hw
        nbytes = self.kv_bytes_per_token(kv_heads, head_dim, kept, vgroup)
        # KV head h lives on weight port h % P: only min(kv_heads, P) pseudo-channels carry the KV stream
        share = max(min(kv_heads, hw.weight_ports), 1) / hw.weight_ports
        stream = (self.stream_cycles(nbytes) - hw.hbm_latency_cycles) / share if nbytes else 0.0
        stream += self.one_port_cycles(SPATTEN_STATE_BYTES * spatten_slots)
        work = heads * (2 * math.ceil(kept / hw.mac_rows) * math.ceil(head_dim / hw.mac_lanes)
                        + 2 * math.ceil(kept / hw.mac_lanes) + RECIP_CYCLES)
        rope = 2 * math.ceil((heads + kv_heads) * head_dim / hw.mac_lanes)
        return T * stream, T * (work + rope + FILL)

    def one_port_cycles(self, nbytes: float) -> float:
        """Streaming cycles of *nbytes* through one weight port (no latency)."""
        return nbytes / (self.hw.port_bytes * self.hw.hbm_efficiency) if nbytes > 0 else 0.0

    def topk_parts(self, layers: int, slots: int, heads: int, alive: list[int]) -> tuple[float, float]:
        """(stream, compute) of TOPK: every layer's state from weights0; quick-select over the alive
        candidates (heads included) of each selecting layer, *alive* one count per such layer."""
        stream = self.one_port_cycles(layers * (9 * slots + 9 * heads))
        compute = sum(TOPK_SCANS * math.ceil(n / TOPK_LANES) + FILL for n in alive) + layers
        return stream, compute

    def attn_cycles(self, heads, kv_heads, head_dim, kept, vgroup=64, T=1) -> float:
        s, c = self.attn_parts(heads, kv_heads, head_dim, kept, vgroup, T)
        return self.hw.hbm_latency_cycles + max(s, c)

    # used by the functional model: (stream, compute) of one executed instruction; a run's cycles are
    # overlapped(parts of all its instructions)
    def instr_parts(self, ins, info: dict, T: int) -> tuple[float, float]:
        k = info.get("kind")
        if k is None or k == "skip":
            return 0.0, 1.0
        if k == "matmul":
            return self.linear_parts(info["N"], info["K"], info["bits"], info["group"], info["sparse"],
                                     info.get("rows", T))
        if k == "sfu":
            passes = {isa.RMSNORM: 4, isa.QUANT: 2, isa.SILUMUL: 3, isa.ADD: 1}.get(ins.op, 2)
            return 0.0, self.sfu_cycles(info["D"], passes, T)
        if k == "attn":
            return self.attn_parts(info["heads"], info["kv_heads"], info["head_dim"], info["kept"],
                                   info.get("vgroup", 64), T=T,
                                   spatten_slots=min(info["pos0"] + T, info["slots"]) if info.get("spatten") else 0)
        if k == "topk":
            return self.topk_parts(info["layers"], info["slots"], info["heads"], info["selected"])
        if k == "embed":
            return T * info["D"] * 4 / self.bytes_per_cycle, float(T)
        if k == "argmax":
            return 0.0, math.ceil(info["V"] / self.hw.mac_lanes) + FILL
        return 0.0, 1.0


def ng_overhead(N: int, hw: HWConfig) -> float:
    """Row-record switch cost: one cycle per row group handed to the array (scales/zeros load)."""
    return math.ceil(N / hw.mac_rows)


# --------------------------------------------------------------------------------------------------
# whole-model projection (accllm perf)
# --------------------------------------------------------------------------------------------------
def _layer_format(recipe, name: str) -> tuple[int, int, bool]:
    """(bits, group, 2:4) the compiler would use for linear layer *name* under *recipe*."""
    import fnmatch
    hp = any(fnmatch.fnmatch(name, p) for p in recipe.high_precision_layers)
    bits = (recipe.high_precision_bits if hp else recipe.weight_bits) or 8     # float layers -> W8 (compiler)
    skip = any(fnmatch.fnmatch(name, p) for p in recipe.prune_skip)
    sparse = recipe.sparsity == "2:4" and not skip
    return bits, recipe.group_size if recipe.weight_bits else 64, sparse


def _dims(shape: dict, recipe):
    """(H, I, L, Hq, Hkv, hd, V, vgroup) of a model config under *recipe*."""
    H, Hq = shape["hidden_size"], shape["num_attention_heads"]
    hd = shape.get("head_dim") or H // Hq
    return (H, shape["intermediate_size"], shape["num_hidden_layers"], Hq, shape["num_key_value_heads"], hd,
            shape["vocab_size"], min(recipe.kv_group_size, hd))


def _block_linears(H, I, Hq, Hkv, hd):
    """(tag, module name for the recipe's layer patterns, N, K, F_ACC) of one decoder layer's MATMULs."""
    return [("qkv", "model.layers.0.self_attn.q_proj", (Hq + 2 * Hkv) * hd, H, False),
            ("o", "model.layers.0.self_attn.o_proj", H, Hq * hd, True),
            ("gate_up", "model.layers.0.mlp.gate_proj", 2 * I, H, False),
            ("down", "model.layers.0.mlp.down_proj", H, I, True)]


def project(shape: dict, recipe, hw: HWConfig, context: int | None = None, prompt: int = 512) -> dict:
    """Bytes and cycles per decode token (at *context* kept KV tokens), prefill and TTFT of *prompt*."""
    cm = CycleModel(hw)
    H, I, L, Hq, Hkv, hd, V, vg = _dims(shape, recipe)
    if context is None:
        context = recipe.sink_tokens + recipe.window if recipe.attention == "lambda" else \
            min(hw.max_context, shape.get("max_position_embeddings", hw.max_context))
    kept = min(context, recipe.sink_tokens + recipe.window) if recipe.attention == "lambda" else context
    per_layer = {}
    wbytes = 0.0
    for tag, name, N, K, _acc in _block_linears(H, I, Hq, Hkv, hd):
        b, g, sp = _layer_format(recipe, name)
        by = cm.linear_bytes(N, K, b, g, sp)
        parts = cm.linear_parts(N, K, b, g, sp)
        per_layer[tag] = dict(N=N, K=K, bits=b, group=g, sparse=sp, bytes=by, parts=parts, cycles=max(parts))
        wbytes += by
    # SpAtten (token_keep / head_keep < 1): per layer from the start layer, only the sinks, the recent tokens and
    # the kept share of the older ones are read, by the kept heads (worst case: no two pruned heads share a KV
    # head); the importance state adds SPATTEN_STATE_BYTES per slot and layer, TOPK 9 per slot and layer
    from hw.compiler import spatten_config
    from hw.numerics import keep_count, keep_q16
    sp = spatten_config(recipe, L, Hq)
    attn_layers = []            # (heads, kv_heads, tokens read) per layer
    if sp is not None:          # sinks and recent tokens are always read; the older ones are the candidates
        s_ = min(sp.sinks, kept)
        r_ = min(sp.recent, kept - s_)
        cand = kept - s_ - r_
    for li in range(L):
        if sp is None or li < sp.start_layer:
            attn_layers.append((Hq, Hkv, kept))
            continue
        hk = keep_count(keep_q16(sp.head_keep[li]), Hq, at_least=1)
        attn_layers.append((hk, min(Hkv, hk), s_ + r_ + keep_count(keep_q16(sp.token_keep[li]), cand)))
    state_slots = kept if sp is not None else 0
    attn_ps = [cm.attn_parts(h_, k_, hd, n_, vg, spatten_slots=state_slots) for h_, k_, n_ in attn_layers]
    attn_c = max(max(p) for p in attn_ps)
    kv_read_layers = [cm.kv_bytes_per_token(k_, hd, n_, vg) for _h, k_, n_ in attn_layers]
    kv_write = Hkv * (hd + 4 * (hd // vg))
    state_bytes = 0
    topk_p = None
    if sp is not None:
        state_bytes = L * (SPATTEN_STATE_BYTES * kept + 9 * (kept + Hq))
        # steady state: each step one token leaves the recent window, so a layer selects among its k + 1
        alive = []
        for li in range(sp.start_layer, L):
            alive += [min(cand, attn_layers[li][2] - s_ - r_ + 1), attn_layers[li][0]]
        topk_p = cm.topk_parts(L, kept, Hq, alive)
    sfu_c = 2 * cm.sfu_cycles(H, 4) + cm.sfu_cycles(I, 3)
    lin_parts = [v["parts"] for v in per_layer.values()]
    sfu_parts = [(0.0, cm.sfu_cycles(H, 4)), (0.0, cm.sfu_cycles(H, 4)), (0.0, cm.sfu_cycles(I, 3))]
    layers_parts = [lin_parts + [ap] + sfu_parts for ap in attn_ps]
    layer_cycles = sum(cm.overlapped(lp) - hw.hbm_latency_cycles for lp in layers_parts) / L
    hb, hg, hs = _layer_format(recipe, "lm_head")
    head_bytes = cm.linear_bytes(V, H, hb, hg, hs)
    embed_bytes = 4 * H
    head_parts = [cm.linear_parts(V, H, hb, hg, hs), (0.0, cm.sfu_cycles(H, 4)),
                  (0.0, math.ceil(V / hw.mac_lanes) + FILL)]
    if topk_p is not None:
        head_parts.append(topk_p)
    head_c = cm.overlapped(head_parts) - hw.hbm_latency_cycles
    all_parts = [(embed_bytes / cm.bytes_per_cycle, 1.0)] + [p for lp in layers_parts for p in lp] + head_parts
    total_cycles = cm.overlapped(all_parts)
    kv_read = sum(kv_read_layers)
    bytes_tok = L * (wbytes + kv_write) + kv_read + state_bytes + head_bytes + embed_bytes
    clk = hw.clock_mhz * 1e6
    hbm_peak = min(hw.weight_ports * hw.port_bytes * clk, HBM_PEAK_BYTES_PER_S * hw.weight_ports / 32)
    decode_tps = clk / total_cycles
    roofline = hbm_peak / bytes_tok
    # prefill: blocks of max_prefill tokens, weights streamed once per block
    T = hw.max_prefill
    nblk = math.ceil(prompt / T)
    blk_parts = [cm.linear_parts(v["N"], v["K"], v["bits"], v["group"], v["sparse"], T) for v in per_layer.values()]
    blk_parts += [(0.0, 2 * cm.sfu_cycles(H, 4, T)), (0.0, cm.sfu_cycles(I, 3, T))]
    blk_attn = [cm.attn_parts(Hq, Hkv, hd, min(kept, prompt), vg, T, spatten_slots=min(state_slots, prompt))] * L
    blk = cm.overlapped([(embed_bytes * T / cm.bytes_per_cycle, T)] + blk_parts * L + blk_attn)
    prefill_cycles = nblk * blk + head_c
    return {
        "model": shape.get("name"), "hw": hw.name, "recipe": recipe.name, "clock_mhz": hw.clock_mhz,
        "context_kept_tokens": kept, "prompt_tokens": prompt,
        "spatten": None if sp is None else {
            "start_layer": sp.start_layer, "tokens_read_per_layer": [n_ for _h, _k, n_ in attn_layers],
            "heads_per_layer": [h_ for h_, _k, _n in attn_layers],
            "note": "steady-state decode: sinks + recent + the kept share of the older tokens; KV heads read "
                    "assume no two pruned heads share a KV head (worst case)"},
        "bytes_per_token": int(bytes_tok),
        "bytes_per_token_breakdown": {"linear_weights": int(L * wbytes), "lm_head": int(head_bytes),
                                      "kv_read": int(kv_read), "kv_write": int(L * kv_write),
                                      "spatten_state": int(state_bytes), "embedding": embed_bytes},
        "cycles_per_layer": int(layer_cycles),
        "cycles_per_layer_breakdown": {**{k: int(v["cycles"]) for k, v in per_layer.items()},
                                       "attention": int(attn_c), "sfu": int(sfu_c),
                                       "note": "each unit alone; the layer total overlaps streams and compute"},
        "cycles_per_token": int(total_cycles),
        "decode_tokens_per_s": decode_tps,
        "hbm_peak_bytes_per_s": hbm_peak,
        "roofline_tokens_per_s": roofline,
        "fraction_of_roofline": decode_tps / roofline,
        "prefill_tokens_per_s": prompt * clk / prefill_cycles,
        "ttft_s": prefill_cycles / clk,
        "validated": False,
        "note": ("target-architecture cycle model (sim/cycle.CycleModel: prefetch across instructions, "
                 "mac_lanes-wide SFU and attention): NOT what the RTL of this version does, not validated"),
        "as_built": as_built(shape, recipe, hw, kept),
    }


def as_built(shape: dict, recipe, hw: HWConfig, kept: int) -> dict:
    """Decode token cycles of the RTL as built (RtlCycleModel: the model `accllm bench rtl --model tiny`
    checks against the kernel's cycle register), at *kept* KV tokens."""
    rm = RtlCycleModel(hw)
    H, I, L, Hq, Hkv, hd, V, vg = _dims(shape, recipe)
    parts = {}
    for tag, name, N, K, acc in _block_linears(H, I, Hq, Hkv, hd):
        b, g, sp = _layer_format(recipe, name)
        parts[tag] = rm.matmul(N, K, b, g, sp, 1, acc)
    slots = max(kept, 1)
    parts["attention"] = rm.attn(Hq, Hkv, hd, vg, slots, slots - 1, 1)
    parts["sfu"] = 2 * rm.row_op(isa.RMSNORM, H, 1) + rm.row_op(isa.SILUMUL, I, 1)
    hb, hg, hs = _layer_format(recipe, "lm_head")
    layer = sum(parts.values())
    instr = [layer / 8] * (8 * L)
    head = [rm.row_op(isa.RMSNORM, H, 1), rm.matmul(V, H, hb, hg, hs, 1, False), rm.instr_cycles(
        isa.Instr(isa.ARGMAX), {"kind": "argmax", "V": V}, 1), 2 * hw.hbm_latency_cycles + 30 + 4 * H / hw.port_bytes]
    total = rm.program_cycles(instr + head)
    clk = hw.clock_mhz * 1e6
    return {"cycles_per_token": int(total), "decode_tokens_per_s": clk / total,
            "cycles_per_layer": int(layer), "cycles_per_layer_breakdown": {k: int(v) for k, v in parts.items()},
            "validated": "sim/cycle.RtlCycleModel vs the kernel's cycle register on sim-small: tiny decode and "
                         "prefill within 0.6 %, SmolLM2-135M within 1.1 % (accllm bench rtl --model ...)",
            "note": "this RTL runs attention 16 channels per cycle, one query head at a time, and nothing overlaps: far "
                    "below the target design"}


# --------------------------------------------------------------------------------------------------
# the RTL as built (hw/rtl, this version): no overlap between instructions, one element per cycle in
# the SFU / attention paths. Fitted to per-instruction cycle counts of the kernel under Verilator
# (sim-small, 100-cycle read latency; docs/rtl.md "cycle model") and checked against whole decode
# tokens by `accllm bench rtl --model tiny`.
# --------------------------------------------------------------------------------------------------
@dataclass
class RtlCycleModel:
    """Cycles of the as-built RTL kernel: a sum over instructions (nothing overlaps), plus one
    instruction-fetch read per beat of instruction words."""
    hw: HWConfig

    def _bts(self, nbytes: float) -> float:
        return math.ceil(nbytes / self.hw.port_bytes)

    def matmul(self, N, K, bits, group, sparse, rows, acc: bool) -> float:
        hw, L, Wb = self.hw, self.hw.hbm_latency_cycles, self.hw.port_bytes
        R = math.ceil(N / hw.weight_ports)
        G = K // group
        kept = K // 2 if sparse else K
        per_row = (1.25 + math.ceil(G * (1 if hw.scale_bits == 8 else 2) / Wb) + math.ceil(G * bits / 8 / Wb)
                   + (math.ceil(3 * (K // 4) / 8 / Wb) if sparse else 0)
                   + math.ceil(kept * bits / 8 / (Wb / 2 if sparse else Wb)))
        # per token: the X8 row (64-byte header + K codes, 64-byte aligned) loads completely before the
        # engine starts (the weight streams' latency hides behind it), then R records per port
        x_beats = (64 + -(-K // 64) * 64) // Wb
        return L + 10 + rows * (L + 15 + x_beats + R * per_row + (L + 2 if acc else 0))

    def row_op(self, op, D, T) -> float:
        L = self.hw.hbm_latency_cycles
        if op == isa.RMSNORM:
            return L + 9 + self._bts(64 + 4 * D) + T * (L + 220 + 4.156 * D)
        if op == isa.QUANT:
            return 4 + T * (L + 54 + 2.156 * D)
        if op == isa.SILUMUL:
            return 4 + T * (L + 55 + 2.281 * D)
        return 4 + T * (2 * L + 15 + 1.375 * D)                 # ADD

    def attn(self, heads, kv_heads, hd, vgroup, slots, pos0, T, ring=True) -> float:
        # the attention core takes 16 channels per cycle: per kept slot and query head hd / 16 cycles of
        # scores, then the V record: its group words (two per cycle) and hd / 16 cycles of P x V (fitted
        # on sim-small, ATTN alone at hd 32/64/128, vgroup 16..64, 1..48 kept slots, T 1 and 4)
        from hw.memmap import v_words_bytes
        L = self.hw.hbm_latency_cycles
        per_kv = 7 * L + 14.2 * hd + 31
        per_q = 4 * L + 5.3 * hd + 145
        total = 2 * L + 251
        for t in range(T):
            n = min(pos0 + t + 1, slots)
            total += kv_heads * per_kv + heads * (per_q + n * (hd / 8 + v_words_bytes(hd, vgroup) / 8)) - 125
        return total

    def attn_spatten(self, heads, alive_heads, kv_heads, hd, vgroup, slots, pos0, alive, runs) -> float:
        """ATTN.spatten (hw/rtl/attn_unit.py): per token the slot scan, only the *alive[t]* slots read in
        *runs[t]* bursts by the alive query heads (isqrt of the head norm each), zeros for pruned heads; per
        instruction the state in and out (flags, importance rows, head state). Fitted on sim-small (ATTN
        alone, hd 32..128, 4/8 heads, 0..70 % pruned slots, 0..4 pruned heads, T 1..4): within 3 %."""
        from hw.memmap import v_words_bytes
        L, Wb = self.hw.hbm_latency_cycles, self.hw.port_bytes
        per_kv = 7 * L + 14.2 * hd + 31
        per_q = 4 * L + 5.3 * hd + 145
        total = 2 * L + 251 - 274
        for t, (n, r) in enumerate(zip(alive, runs)):
            total += (kv_heads * per_kv + alive_heads * (per_q + n * (hd / 8 + v_words_bytes(hd, vgroup) / 8)
                                                         + (r - 1) * (2 * L + 6) + 29 - 183)
                      + (heads - alive_heads) * (hd + 23) - 125 + min(pos0 + t + 1, slots) + 2 + 831)
        total += (2 * L + 8) + (L + slots + 2)                                    # descriptors, flags in
        total += (heads + 1 - 184) if pos0 == 0 else (2 * L + 2 * heads + 4)
        total += ((L + slots + 2) + (slots + math.ceil(8 * slots / Wb) + L + 3) + (slots + math.ceil(slots / Wb) + L + 3)
                  + (heads + math.ceil(8 * heads / Wb) + L + 3) + ((heads + L + 4) if pos0 == 0 else 1))
        return total

    def topk(self, info: dict) -> float:
        """TOPK (hw/rtl/topk_unit.py) from the functional model's account of the run (``info["steps"]``: per
        layer from the start layer, tokens then heads: candidates n, alive, k, the quick-select rounds
        (pivot index, candidates left) and whether any flag is written). Coefficients fitted on sim-small
        (36 random runs: Λ and linear caches, 1..4 layers, 0..117 candidates, 1..16 heads): within 7.1 %;
        a burst costs about the read latency + 13."""
        L = self.hw.hbm_latency_cycles
        burst = L + 13
        total = 390.0
        segs = info.get("segments", 1) if info.get("candidates", 0) else 0
        total += info["layers"] * ((segs + 1) * (burst + 2) + 0.63 * (info.get("candidates", 0) + info["heads"]))
        for j, st in enumerate(info.get("steps", [])):
            if st["n"] == 0:
                continue
            total += (segs if j % 2 == 0 else 1) * (burst - 2) + 1.41 * st["n"]
            if st["alive"] > st["k"]:
                total += -66 + 5.04 * st["alive"] + sum(0.95 * (p + 2 * n) + 40 for p, n in st["rounds"])
            if st["write"]:
                total += -21 + 1.83 * st["n"]
        return total

    def instr_cycles(self, ins, info: dict, T: int) -> float:
        k = info.get("kind")
        L = self.hw.hbm_latency_cycles
        if k is None or k == "skip":
            return 3.0
        if k == "matmul":
            return self.matmul(info["N"], info["K"], info["bits"], info["group"], info["sparse"], info.get("rows", T),
                               bool(ins.flags & isa.F_ACC))
        if k == "sfu":
            return self.row_op(ins.op, info["D"], T)
        if k == "attn" and info.get("alive") is not None:
            return self.attn_spatten(info["all_heads"], info["heads"], info["all_kv_heads"], info["head_dim"],
                                     info["vgroup"], info["slots"], info["pos0"], info["alive"], info["runs"])
        if k == "attn":
            return self.attn(info["heads"], info["kv_heads"], info["head_dim"], info.get("vgroup", 64),
                             info["slots"], info.get("pos0", 0), T)
        if k == "topk":
            return self.topk(info)
        if k == "embed":
            return 2 * L + 10 + T * (2 * L + 20 + info["D"] * 4 / self.hw.port_bytes)
        if k == "argmax":
            return L + 14 + info["V"] * (1 + 4 / self.hw.port_bytes)
        return 3.0

    def program_cycles(self, instr_cycles: list[float]) -> float:
        """Instructions back to back + one fetch (latency + 5) per beat of words (END included)."""
        words_per_beat = self.hw.port_bytes // 16
        n = len(instr_cycles) + 1
        return sum(instr_cycles) + math.ceil(n / words_per_beat) * (self.hw.hbm_latency_cycles + 5) + 3 * n
