"""What every execution unit of the kernel shares: the signature it implements towards the sequencer
(hw/rtl/kernel.py) and the decoding of its instruction word."""
from __future__ import annotations

from amaranth import Cat, Const
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from hw.config import HWConfig

from .axi import XFER, write_beat


def unit_signature(cfg: HWConfig) -> wiring.Signature:
    W = cfg.port_width_bits
    beat = write_beat(W)
    members = {
        "start": In(1), "word": In(128), "done": Out(1), "status": Out(8),
        "position": In(32), "n_tokens": In(32), "flags": In(32),
        "kv": In(64), "io": In(64),
        "rd_cmd": Out(stream.Signature(XFER)), "rd_data": In(stream.Signature(W)),
        "wr_cmd": Out(stream.Signature(XFER)), "wr_data": Out(stream.Signature(beat)), "wr_busy": In(1),
    }
    P = cfg.weight_ports
    members.update({
        "weights": In(64).array(P),                          # the weights<p> buffer addresses
        "w_cmd": Out(stream.Signature(XFER)).array(P), "w_data": In(stream.Signature(W)).array(P),
        # write path of the weight ports (the KV cache lives in the weight buffers: hw/compiler.py)
        "ww_cmd": Out(stream.Signature(XFER)).array(P), "ww_data": Out(stream.Signature(beat)).array(P),
        "ww_busy": In(1).array(P),
    })
    return wiring.Signature(members)


def _fields(word):
    return dict(op=word[0:8], flags=word[8:16], c=word[16:32], a=word[32:64], b=word[64:96], d=word[96:128])


def _end64(base, extent):
    """True when [base, base + extent) runs past the 4 GiB offset space of a buffer argument."""
    return (Cat(base, Const(0, 32)) + extent) > (1 << 32)
