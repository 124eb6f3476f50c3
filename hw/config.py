"""Hardware configurations of the accelerator: named presets plus overrides.

One HWConfig is the single source of the accelerator's parameters for the compiler, the
functional model, the cycle model, the RTL generator and the host runtime (register map,
buffer placement). A compiled package records the configuration it was compiled for.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields

from algo.common import AccllmError


@dataclass(frozen=True)
class HWConfig:
    name: str
    clock_mhz: float                 # kernel clock
    weight_ports: int                # AXI4 masters streaming weights, one HBM pseudo-channel each
    port_width_bits: int             # data width of every AXI4 master (256 or 512)
    mac_rows: int                    # output rows the matrix engine computes in parallel
    mac_lanes: int                   # int8 activations consumed per row per cycle (inner dimension)
    max_hidden: int                  # largest model dimension (K or N of any layer except lm_head N)
    max_context: int                 # KV slots per layer and KV head (sink + window must fit)
    max_prefill: int                 # tokens in one prefill block (matrix-matrix)
    max_layers: int
    hbm_latency_cycles: int = 100    # read latency the DMA must hide (cycle model and RTL test)
    hbm_efficiency: float = 0.9      # achievable fraction of the port's peak on long bursts
    outstanding_reads: int = 16      # AXI read bursts in flight per port
    burst_beats: int = 16            # beats per AXI read burst
    scale_bits: int = 16             # hardware weight-scale mantissa bits (hw/numerics.scales_to_hw)
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def port_bytes(self) -> int:
        return self.port_width_bits // 8

    @property
    def peak_bytes_per_s(self) -> float:
        return self.weight_ports * self.port_bytes * self.clock_mhz * 1e6

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


PRESETS: dict[str, dict] = {
    # The real card: 32 HBM2 pseudo-channels, one 512-bit AXI4 master each at 225 MHz
    # (32 x 64 B x 225 MHz = 460.8 GB/s, the card's HBM peak). 96 x 64 W2xA8 MAC array (LUT
    # multipliers; keeps compute below the weight stream for 2:4 W2, sim/cycle.py); 8-bit scale
    # mantissas + per-row shift (0.125 bit/weight instead of 0.25; quality cost in README/docs).
    "u280": dict(name="u280", clock_mhz=225.0, weight_ports=32, port_width_bits=512, mac_rows=96,
                 mac_lanes=64, max_hidden=16384, max_context=4096, max_prefill=128, max_layers=80, scale_bits=8),
    # Small enough for fast RTL simulation; still runs `tiny` and SmolLM2-135M.
    "sim-small": dict(name="sim-small", clock_mhz=100.0, weight_ports=2, port_width_bits=256, mac_rows=4,
                      mac_lanes=32, max_hidden=2048, max_context=2048, max_prefill=32, max_layers=32, scale_bits=8),
}


def load_hw(name: str, sets: list[str] | None = None) -> HWConfig:
    if name not in PRESETS:
        raise AccllmError(f"unknown hardware configuration {name!r}; presets: {', '.join(PRESETS)}")
    d = dict(PRESETS[name])
    types = {f.name: f.type for f in fields(HWConfig)}
    for s in sets or []:
        if "=" not in s:
            raise AccllmError(f"--hw-set takes key=value, got {s!r}")
        k, v = (x.strip() for x in s.split("=", 1))
        if k not in types or k in ("name", "extra"):
            raise AccllmError(f"unknown hardware key {k!r}; keys: "
                              f"{', '.join(t for t in types if t not in ('name', 'extra'))}")
        try:
            d[k] = float(v) if types[k] == "float" else int(v, 0)
        except ValueError:
            raise AccllmError(f"hardware key {k} takes a number, got {v!r}") from None
    cfg = HWConfig(**d)
    validate(cfg)
    return cfg


# accepted ranges of the numeric keys (inclusive); every key must also have its declared type
RANGES: dict[str, tuple[float, float]] = {
    "clock_mhz": (1.0, 1000.0), "weight_ports": (1, 32), "mac_rows": (1, 4096), "mac_lanes": (1, 4096),
    "max_hidden": (1, 1 << 20), "max_context": (1, 1 << 24), "max_prefill": (1, 1 << 16), "max_layers": (1, 1024),
    "hbm_latency_cycles": (0, 100_000), "hbm_efficiency": (0.01, 1.0), "outstanding_reads": (1, 256),
    "burst_beats": (1, 256),
}


def validate(cfg: HWConfig) -> None:
    import math
    for f in fields(HWConfig):
        v = getattr(cfg, f.name)
        if f.name in ("name", "extra"):
            continue
        if f.type == "float":
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise AccllmError(f"hardware key {f.name} takes a finite number, got {v!r}")
        elif isinstance(v, bool) or not isinstance(v, int):
            raise AccllmError(f"hardware key {f.name} takes an integer, got {v!r}")
        if f.name in RANGES:
            lo, hi = RANGES[f.name]
            if not lo <= v <= hi:
                raise AccllmError(f"hardware key {f.name} must lie in [{lo:g}, {hi:g}], got {v!r}")
    if cfg.port_width_bits not in (256, 512):
        raise AccllmError(f"port_width_bits must be 256 or 512, got {cfg.port_width_bits}")
    if cfg.scale_bits not in (8, 16):
        raise AccllmError(f"scale_bits must be 8 or 16, got {cfg.scale_bits}")


def hw_from_dict(d: dict) -> HWConfig:
    d = {k: v for k, v in d.items() if k in {f.name for f in fields(HWConfig)}}
    cfg = HWConfig(**d)
    validate(cfg)
    return cfg
