"""Host runtime logic (chunked prefill, decode loop, sampling, EOS, Scorer adapter, sessions, timeout,
Ctrl-C) against a STAND-IN device: ``ToyStandInDevice`` follows the runtime protocol of hw/memmap.py
(entry/program_len/position/n_tokens/flags registers, token ids in io, Q16.16 logits rows, argmax,
KV state in the kv buffer) with a tiny made-up model instead of the accelerator. It is not the
functional model; the real protocol test is emu vs rtl on a compiled package (test_host_runtime.py)."""
import json
import threading

import numpy as np
import pytest
import torch

from algo.common import AccllmError
from hw import memmap, regmap
from hw.config import load_hw
from hw.device import DeviceBusy, DeviceTimeout, MemoryDevice
from host.runtime import DeviceScorer, Runtime, Sampler, Sampling
from quant.package import FORMAT_VERSION, write_manifest

V = 16
BUCKETS = {0: 1, 4: 8, 8: 4}      # entry offset -> tokens (0 = decode)
EOS = 7


def toy_logits(W, history):
    """Reference: logits of the last token of *history* (list of ids)."""
    p = len(history) - 1
    h = sum(t * (q + 1) for q, t in enumerate(history)) % V
    row = W[history[-1]].astype(np.int64).copy()
    row[h] += 3 << 16
    return row


class ToyStandInDevice(MemoryDevice):
    backend = "emu"

    def __init__(self, hw):
        super().__init__(hw)
        self.hang = False
        self.interrupt_at = None
        self.log = []

    def write_register(self, offset, value):
        if offset == regmap.AP_CTRL and value & regmap.AP_START and self.hang:
            self.regs[regmap.AP_CTRL] = regmap.AP_START        # never finishes
            return
        super().write_register(offset, value)

    def execute(self):
        if self.interrupt_at is not None and len(self.log) == self.interrupt_at:
            raise KeyboardInterrupt
        entry, plen = self.read_arg("entry"), self.read_arg("program_len")
        pos, n, flags = self.read_arg("position"), self.read_arg("n_tokens"), self.read_arg("flags")
        self.log.append((self.busy_by, entry, pos, n, flags))
        if entry not in BUCKETS or plen != entry + 4 or n > BUCKETS[entry] or n < 1:
            return regmap.STATUS_SHAPE, 0, 1
        if pos + n > self.hw.max_context:
            return regmap.STATUS_POSITION, 0, 1
        io, kv, w = self.arg_buffer("io").handle, self.arg_buffer("kv").handle, self.arg_buffer("weights0").handle
        W = w[:V * V * 4].view("<i4").reshape(V, V)
        toks = io[0:4 * n].view("<i4")
        hist = kv.view("<i4")
        hist[pos:pos + n] = toks
        rows = [toy_logits(W, list(hist[:pos + i + 1])) for i in range(n)]
        if flags & 1:
            io[64:64 + 4 * V * n] = np.asarray(rows, "<i4").reshape(-1).view(np.uint8)
        if flags & 2:
            io[32:36] = np.asarray([int(np.argmax(rows[-1]))], "<i4").view(np.uint8)
        return regmap.STATUS_OK, 0, 100 * n


@pytest.fixture()
def pkg(tmp_path):
    hw = load_hw("sim-small")
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((V, V)) * 65536).astype("<i4")
    (tmp_path / "hbm_w0.bin").write_bytes(W.tobytes())
    (tmp_path / "program.bin").write_bytes(bytes(16 * 12))
    mm = {"format": memmap.FORMAT, "version": memmap.VERSION,
          "buffers": {"program": {"port": "m_axi_ctrl", "bank": 0, "size": 4096, "file": "program.bin"},
                      "io": {"port": "m_axi_ctrl", "bank": 0, "size": 4096},
                      "kv": {"port": "m_axi_ctrl", "bank": 1, "size": 4 * 4096},
                      "weights0": {"port": "m_axi_w0", "bank": 0, "size": 4096, "file": "hbm_w0.bin"},
                      "weights1": {"port": "m_axi_w1", "bank": 1, "size": 4096}},
          "entries": {"decode": {"offset": 0, "length": 4},
                      "prefill": [{"tokens": 8, "offset": 4, "length": 4}, {"tokens": 4, "offset": 8, "length": 4}]},
          "io": {"tokens_in": {"offset": 0, "dtype": "int32", "count": 8},
                 "logits_out": {"offset": 64, "dtype": "int32", "count": V, "scale": 1 / 65536},
                 "argmax_out": {"offset": 32, "dtype": "int32"}},
          "attention": {"kind": "lambda"}, "vocab_size": V, "eos_token_id": EOS}
    (tmp_path / "memmap.json").write_text(json.dumps(mm))
    man = {"format": "accllm-package", "format_version": FORMAT_VERSION, "hw": hw.to_dict(), "source": {"spec": "toy"},
           "model_config": {"eos_token_id": EOS, "max_position_embeddings": 64}}
    write_manifest(tmp_path, man)
    return tmp_path, W, hw


def ref_greedy(W, prompt, n, stop=True):
    hist, out = list(prompt), []
    for _ in range(n):
        t = int(np.argmax(toy_logits(W, hist)))
        out.append(t)
        hist.append(t)
        if stop and t == EOS:
            break
    return out


def test_generate_matches_reference_with_chunked_prompts(pkg):
    d, W, hw = pkg
    dev = ToyStandInDevice(hw)
    with Runtime(d, dev, verify=False) as rt:
        for plen in (1, 3, 8, 13, 21):
            prompt = [(i * 5 + 1) % V for i in range(plen)]
            got = list(rt.generate(prompt, 12, stop_at_eos=False))
            assert got == ref_greedy(W, prompt, 12, stop=False), plen
        # chunking: 21 tokens -> 8 + 8 + 5 (partial bucket of 8), never more than a bucket per run
        assert all(n <= BUCKETS[e] for _, e, _, n, _ in dev.log)
        # sampling from logits (not argmax) with top_k=1 is greedy too, and reads one logits row
        prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
        got = list(rt.generate(prompt, 6, Sampling(temperature=1.0, top_k=1), stop_at_eos=False))
        assert got == ref_greedy(W, prompt, 6, stop=False)
        # EOS stops generation
        for first in range(V):
            ref = ref_greedy(W, [first], 40)
            if ref[-1] == EOS:
                assert list(rt.generate([first], 40)) == ref
                break
        st = rt.stats
        assert st.ttft_s > 0 and st.cycles > 0


def test_sampler():
    logits = np.array([0.0, 1.0, 5.0, 1.0])
    assert Sampler(Sampling())(logits) == 2
    assert Sampler(Sampling(temperature=1.0, top_p=0.5, seed=1))(logits) == 2
    a = [Sampler(Sampling(temperature=2.0, seed=s))(np.zeros(50)) for s in range(20)]
    b = [Sampler(Sampling(temperature=2.0, seed=s))(np.zeros(50)) for s in range(20)]
    assert a == b and len(set(a)) > 5                   # seeded and actually random
    s = Sampler(Sampling(temperature=1.0, top_k=2, seed=0))
    picks = {s(np.array([0.0, 3.0, 2.9, -1.0])) for _ in range(200)}
    assert picks == {1, 2}
    for bad in (dict(temperature=-1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(AccllmError):
            Sampling(**bad)


def test_device_scorer_runs_the_one_harness(pkg):
    from algo.eval import perplexity_chunks
    d, W, hw = pkg
    tokens = torch.tensor([(i * 7 + 3) % V for i in range(40)])
    with Runtime(d, ToyStandInDevice(hw), verify=False) as rt:
        res = perplexity_chunks(DeviceScorer(rt), tokens, ctx=20, chunks=2, progress=False)
    nll = []
    for c in range(2):
        seq = tokens[c * 20:(c + 1) * 20].tolist()
        for i in range(19):
            lg = torch.tensor(toy_logits(W, seq[:i + 1]) / 65536.0)
            nll.append(float(torch.nn.functional.cross_entropy(lg[None], torch.tensor([seq[i + 1]]))))
    assert res["ppl"] == pytest.approx(float(np.exp(np.mean(nll))), rel=1e-5)


def test_sessions_are_refused_or_serialised_never_interleaved(pkg):
    d, W, hw = pkg
    dev = ToyStandInDevice(hw)
    with Runtime(d, dev, owner="A", verify=False):
        with pytest.raises(DeviceBusy, match="'A'"):
            Runtime(d, dev, owner="B", verify=False)
    dev.log.clear()
    results, errors = {}, []

    def worker(name):
        try:
            with Runtime(d, dev, owner=name, wait_s=30, verify=False) as rt:
                results[name] = [list(rt.generate([1, 2, 3, (k + len(name)) % V], 10, stop_at_eos=False))
                                 for k in range(3)]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    ts = [threading.Thread(target=worker, args=(n,)) for n in ("one", "two", "three")]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors
    owners = [o for o, *_ in dev.log]
    blocks = [o for i, o in enumerate(owners) if i == 0 or owners[i - 1] != o]
    assert sorted(blocks) == ["one", "three", "two"], "runs of two sessions were interleaved"
    for name, outs in results.items():
        assert outs == [ref_greedy(W, [1, 2, 3, (k + len(name)) % V], 10, stop=False) for k in range(3)]


def test_timeout_dumps_registers_and_device_stays_usable(pkg):
    d, W, hw = pkg
    dev = ToyStandInDevice(hw)
    with Runtime(d, dev, verify=False, timeout_s=0.05) as rt:
        dev.hang = True
        with pytest.raises(DeviceTimeout, match=r"registers: AP_CTRL=0x1 .*position=0x0 n_tokens=0x3"):
            list(rt.generate([1, 2, 3], 4))
        assert dev.read_register(regmap.AP_CTRL) & regmap.AP_IDLE
        dev.hang = False
        assert list(rt.generate([1, 2, 3], 4, stop_at_eos=False)) == ref_greedy(W, [1, 2, 3], 4, stop=False)


def test_ctrl_c_mid_generation_leaves_device_idle_and_free(pkg):
    d, W, hw = pkg
    dev = ToyStandInDevice(hw)
    dev.interrupt_at = 3
    with pytest.raises(KeyboardInterrupt):
        with Runtime(d, dev, verify=False) as rt:
            for _ in rt.generate([1, 2], 20, stop_at_eos=False):
                pass
    assert dev.read_register(regmap.AP_CTRL) == regmap.AP_IDLE
    assert dev.busy_by is None
    dev.interrupt_at = None
    with Runtime(d, dev, verify=False) as rt:            # the device is free and works
        assert list(rt.generate([1, 2], 5, stop_at_eos=False)) == ref_greedy(W, [1, 2], 5, stop=False)


def test_bad_input(pkg):
    d, W, hw = pkg
    dev = ToyStandInDevice(hw)
    with pytest.raises(AccllmError, match="compiled for hardware configuration 'sim-small', the device is 'u280'"):
        Runtime(d, ToyStandInDevice(load_hw("u280")), verify=False)
    with Runtime(d, dev, verify=False) as rt:
        with pytest.raises(AccllmError, match="outside the vocabulary"):
            list(rt.generate([1, V + 3], 2))
        with pytest.raises(AccllmError, match="empty"):
            list(rt.generate([], 2))
        with pytest.raises(AccllmError, match="max-new-tokens"):
            list(rt.generate([1], 0))
    mm = json.loads((d / "memmap.json").read_text())
    mm["attention"] = {"kind": "full"}
    (d / "memmap.json").write_text(json.dumps(mm))
    with Runtime(d, dev, verify=False) as rt:
        with pytest.raises(AccllmError, match="beyond what this package supports .*Λ"):
            list(rt.generate([1] * 60, 10))
    man = json.loads((d / "manifest.json").read_text())
    man["format_version"] = 99
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(AccllmError, match="format_version 99"):
        Runtime(d, dev, verify=False)


def test_interrupted_generation_keeps_true_cycle_statistics(pkg):
    """Ctrl-C in the middle of decoding: the statistics count the runs that completed (100 cycles per
    token on the stand-in device), not zero."""
    d, W, hw = pkg
    dev = ToyStandInDevice(hw)
    dev.interrupt_at = 4                  # the prefill run + 3 decode runs complete, the 5th is interrupted
    rt = Runtime(d, dev, verify=False)
    got = []
    with pytest.raises(KeyboardInterrupt):
        for tok in rt.generate([1, 2], 20, stop_at_eos=False):
            got.append(tok)
    st = rt.stats
    rt.close()
    assert len(got) == 4 and st.runs == 4
    assert st.prefill_cycles == 200 and st.decode_cycles == 300
