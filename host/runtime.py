"""The host runtime: one code path for the functional model (emu), the RTL simulation (rtl) and the
Alveo card (xrt).

    from host.runtime import open_runtime
    with open_runtime("build/smollm2", backend="emu") as rt:
        for tok in rt.generate("The capital of France is", max_new_tokens=16):
            print(rt.decode([tok]), end="", flush=True)
        print(rt.stats)

What it does:
* loads a compiled package through ``quant.package.load_package`` (format, format_version and every
  file's sha256 are checked there; a tampered or incomplete package is refused naming the file) and
  refuses a package compiled for another hardware configuration than the device's;
* allocates the buffers of the package's memory map (``memmap.json``, see :class:`Protocol`) with
  their HBM bank / AXI port and uploads the program and weights once;
* holds the device for its lifetime (``Device.session``): two runtimes on one device are refused
  (or serialised with ``wait_s``), never interleaved;
* prefill then decode step by step; prompts longer than the largest prefill bucket are split into
  bucket-sized chunks (and single-token steps for the rest); host-side sampling (greedy,
  temperature, top-k, top-p, seed); ``generate()`` yields token ids as they come and stops at EOS or
  the limit; with Λ-shaped attention (sink + window ring buffer in the KV region) positions may run
  past the model's trained context, with full attention they may not (refused clearly);
* ``DeviceScorer``: the one perplexity harness (algo.eval) scoring through the device;
* Ctrl-C: the step in flight is finished or the device reset, the session is released, the device
  is idle afterwards; the rtl backend's simulator process is gone after ``close()``.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from algo.common import AccllmError
from hw import regmap

FLAG_LOGITS, FLAG_ARGMAX = 1, 2


# ---------------------------------------------------------------------------------------------
# package
# ---------------------------------------------------------------------------------------------
def read_package_manifest(path) -> dict:
    """manifest.json of a package with the format checks (no sha256 of the files: load_package_verified)."""
    from quant.package import read_manifest
    return read_manifest(path)


def load_package_verified(path):
    """quant.package.load_package: format checks and every file's sha256."""
    from quant.package import load_package
    return load_package(path)


def check_hw(manifest: dict, hw, where: str = "package") -> None:
    """Refuse a package compiled for another hardware configuration than *hw*."""
    if "hw" not in manifest:
        raise AccllmError(f"{where} was not compiled for hardware (no 'hw' in manifest.json); run compile-model "
                          f"with --hw {hw.name}")
    got = dict(manifest["hw"])
    want = hw.to_dict()
    diff = [k for k in want if k != "extra" and k in got and got[k] != want[k]]
    missing = [k for k in want if k != "extra" and k not in got]
    if diff or missing:
        what = ", ".join(f"{k}={got[k]!r} (device {want[k]!r})" for k in diff)
        if missing:
            what += (", " if what else "") + f"missing keys {', '.join(missing)}"
        raise AccllmError(f"{where} was compiled for hardware configuration {got.get('name')!r}, the device is "
                          f"{hw.name!r}: {what}; recompile with compile-model --hw {hw.name}")


def tokenizer_for(package_dir, manifest: dict):
    """The tokenizer of a package: tokenizer files inside it, else the source model's."""
    d = Path(package_dir)
    if (d / "tokenizer.json").is_file():
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(d))
    spec = (manifest.get("source") or {}).get("spec")
    if spec in ("tiny", "smollm2-135m"):
        from algo.models import smollm2_tokenizer
        return smollm2_tokenizer()
    if spec and Path(spec).is_dir() and (Path(spec) / "tokenizer.json").is_file():
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(spec)
    if spec:
        from algo.models import load_model
        return load_model(spec).tokenizer
    raise AccllmError(f"package {d}: no tokenizer inside and no source model in manifest.json")


# ---------------------------------------------------------------------------------------------
# the runtime protocol of memmap.json
# ---------------------------------------------------------------------------------------------
@dataclass
class BufferSpec:
    name: str            # regmap pointer argument it is passed as (program, kv, io, weights<p>)
    port: str
    bank: int
    size: int
    file: str | None = None          # package file with its initial contents (uploaded once)
    file_offset: int = 0             # where in the buffer the file goes


@dataclass
class Entry:
    offset: int          # instruction index of the entry point in program.bin
    length: int          # instructions
    tokens: int          # 1 for decode, the bucket size for prefill


@dataclass
class Slot:
    offset: int
    dtype: str
    count: int
    scale: float = 1.0   # for integer logits: float value = raw * scale


@dataclass
class Protocol:
    """What the compiler's memmap.json tells the runtime (hw/memmap.py writes it):

    ``buffers``: name → {port, bank, size, [file, file_offset]} — every pointer argument's buffer;
    ``entries``: ``decode`` {offset, length} and ``prefill`` [{tokens, offset, length}, ...] (buckets);
    ``io``: ``tokens_in`` {offset, dtype, count}, ``logits_out`` {offset, dtype, count[, scale]},
    ``argmax_out`` {offset, dtype} — byte offsets in the ``io`` buffer;
    ``logits_rows``: "last" (only the last token of a run writes logits) or "all" (one row per token,
    row stride = count);
    ``prefill_partial``: true if a prefill bucket accepts n_tokens < bucket (else chunks are exact);
    ``attention``: "full" or "lambda" (with ``sink``, ``window``) and ``max_position`` (None: unbounded).
    """
    buffers: dict[str, BufferSpec]
    decode: Entry
    prefill: list[Entry]
    tokens_in: Slot
    logits_out: Slot
    argmax_out: Slot | None
    logits_rows: str = "last"
    prefill_partial: bool = False
    attention: str = "full"
    max_position: int | None = None
    vocab_size: int = 0
    eos_token_id: int | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, d: dict, hw) -> "Protocol":
        if "format" in d:
            try:
                from hw.memmap import FORMAT, VERSION, validate_memmap
            except ImportError:
                validate_memmap = None
            if validate_memmap is not None:
                if d.get("format") == FORMAT and str(d.get("version")) != str(VERSION):
                    raise AccllmError(f"memmap.json is version {d.get('version')}, this accllm reads {VERSION}: the "
                                      "package's program was compiled by another accllm version; compile it again "
                                      "(stage 2 only, seconds): accllm compile --package DIR --hw CONFIG --out DIR")
                validate_memmap(d)
            # hw/memmap.py: flags bit 0 writes the logits of every token of the run; partial buckets ok
            d = dict({"logits_rows": "all", "prefill_partial": True}, **d)
        try:
            bufs = d["buffers"]
            if isinstance(bufs, list):
                bufs = {b["name"]: b for b in bufs}
            buffers = {k: BufferSpec(k, v["port"], int(v["bank"]), int(v["size"]), v.get("file"),
                                     int(v.get("file_offset", 0))) for k, v in bufs.items()}
            ent = d["entries"]
            dec = ent["decode"]
            decode = Entry(int(dec["offset"]), int(dec["length"]), 1)
            prefill = sorted((Entry(int(e["offset"]), int(e["length"]), int(e["tokens"]))
                              for e in ent.get("prefill", [])), key=lambda e: e.tokens)
            io = d["io"]

            def slot(s):
                return None if s is None else Slot(int(s["offset"]), s.get("dtype", "int32"), int(s.get("count", 1)),
                                                   float(s.get("scale", 1.0)))
            att = d.get("attention", {})
            if isinstance(att, str):
                att = {"kind": att}
            p = cls(buffers, decode, prefill, slot(io["tokens_in"]), slot(io["logits_out"]), slot(io.get("argmax_out")),
                    d.get("logits_rows", "last"), bool(d.get("prefill_partial", False)),
                    att.get("kind", "full"), d.get("max_position"), int(d.get("vocab_size", io["logits_out"]["count"])),
                    d.get("eos_token_id"), d)
        except (KeyError, TypeError, ValueError) as e:
            raise AccllmError(f"memmap.json does not follow the runtime protocol (hw/memmap.py): {e!r}") from None
        args = {a.name: a for a in regmap.arguments(hw)}
        for name, b in p.buffers.items():
            if name not in args or args[name].kind != "ptr":
                raise AccllmError(f"memmap.json: buffer {name!r} is not a pointer argument of the register map")
            if args[name].port != b.port:
                raise AccllmError(f"memmap.json: buffer {name!r} on port {b.port}, the register map says {args[name].port}")
        need = [a.name for a in args.values() if a.kind == "ptr" and a.name not in p.buffers]
        if need:
            raise AccllmError(f"memmap.json has no buffer for {', '.join(need)}")
        return p


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------
@dataclass
class Sampling:
    temperature: float = 0.0      # 0: greedy
    top_k: int = 0                # 0: off
    top_p: float = 1.0            # 1: off
    seed: int = 0

    def __post_init__(self):
        import math
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not math.isfinite(self.temperature) or self.temperature < 0:
            raise AccllmError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise AccllmError(f"top-k must be >= 0 (0 = off), got {self.top_k}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):      # NaN fails here too
            raise AccllmError(f"top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Host-side sampling of the next token from float logits."""

    def __init__(self, s: Sampling):
        self.s = s
        self.rng = np.random.default_rng(s.seed)

    def __call__(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits, dtype=np.float64)
        if self.s.greedy:
            return int(np.argmax(logits))      # first maximum: the same tie-break as the device's argmax
        z = logits / self.s.temperature
        if 0 < self.s.top_k < z.size:
            kth = np.partition(z, -self.s.top_k)[-self.s.top_k]
            z = np.where(z >= kth, z, -np.inf)
        z = z - z.max()
        p = np.exp(z)
        p /= p.sum()
        if self.s.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            keep = order[: int(np.searchsorted(cum, self.s.top_p) + 1)]
            q = np.zeros_like(p)
            q[keep] = p[keep]
            p = q / q.sum()
        return int(self.rng.choice(p.size, p=p))


# ---------------------------------------------------------------------------------------------
# the runtime
# ---------------------------------------------------------------------------------------------
@dataclass
class Stats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    ttft_s: float = 0.0
    decode_s: float = 0.0
    runs: int = 0
    cycles: int | None = 0           # device cycles (sum over runs; None if the device cannot tell)
    prefill_cycles: int | None = 0
    decode_cycles: int | None = 0

    @property
    def decode_tokens_per_s(self) -> float:
        n = self.new_tokens - 1          # the first token comes from prefill
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


class Runtime:
    """A compiled package loaded onto a device. Use as a context manager (or call close())."""

    def __init__(self, package_dir, device, *, owner: str = "runtime", wait_s: float = 0.0,
                 timeout_s: float | None = None, tokenizer=None, verify: bool = True):
        self.device = device
        self.dir = Path(package_dir)
        self.package = load_package_verified(self.dir) if verify else None
        self.manifest = self.package.manifest if self.package is not None else read_package_manifest(self.dir)
        check_hw(self.manifest, device.hw, where=f"package {self.dir}")
        mm = self.dir / "memmap.json"
        if not mm.is_file():
            raise AccllmError(f"package {self.dir} has no memmap.json (compile it with compile-model --hw ...)")
        self.proto = Protocol.from_json(json.loads(mm.read_text()), device.hw)
        self.timeout_s = timeout_s if timeout_s is not None else self._default_timeout()
        self._tokenizer = tokenizer
        self._session_cm = device.session(owner, wait_s=wait_s)
        self._session_cm.__enter__()
        self.position = 0
        self.stats = Stats()
        self.closed = False
        try:
            self.buffers = {}
            for name, spec in self.proto.buffers.items():
                self.buffers[name] = device.alloc(spec.size, port=spec.port, bank=spec.bank, name=name)
            self.upload_seconds = self._upload()
        except BaseException:
            self.close()
            raise

    def _default_timeout(self) -> float:
        return {"emu": 600.0, "rtl": 3600.0, "xrt": 10.0}.get(getattr(self.device, "backend", ""), 600.0)

    def _upload(self) -> float:
        t0 = time.perf_counter()
        for name, spec in self.proto.buffers.items():
            if spec.file:
                p = self.dir / spec.file
                if not p.is_file():
                    raise AccllmError(f"package {self.dir}: memmap.json names {spec.file} for buffer {name}, which is missing")
                data = np.fromfile(p, dtype=np.uint8)
                if spec.file_offset + data.size > spec.size:
                    raise AccllmError(f"package {self.dir}: {spec.file} ({data.size} bytes at {spec.file_offset}) does "
                                      f"not fit buffer {name} ({spec.size} bytes)")
                self.buffers[name].upload(data, spec.file_offset)
        return time.perf_counter() - t0

    # ---- tokenizer -------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = tokenizer_for(self.dir, self.manifest)
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        if self.proto.eos_token_id is not None:
            return int(self.proto.eos_token_id)
        e = self.manifest.get("model_config", {}).get("eos_token_id")
        if isinstance(e, list):
            e = e[0] if e else None
        return e

    # ---- device steps ----------------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new sequence at position 0 (KV slots are only read for positions already written)."""
        self.position = 0

    def _check_position(self, n: int) -> None:
        end = self.position + n
        if self.proto.attention == "full" or self.proto.max_position is not None:
            limit = self.proto.max_position
            if limit is None:
                limit = min(self.device.hw.max_context,
                            int(self.manifest.get("model_config", {}).get("max_position_embeddings", 1 << 31)))
            if end > limit:
                raise AccllmError(f"position {end} is beyond what this package supports ({limit} tokens with "
                                  f"{self.proto.attention} attention); use a recipe with Λ-shaped attention to "
                                  f"generate past the context, or a shorter prompt / --max-new-tokens")
        if end >= 1 << 32:
            raise AccllmError("position does not fit the 32-bit position register")

    def _plan(self, n: int) -> list[Entry]:
        """Split *n* tokens into runs: largest prefill bucket first, single-token decode for the rest
        (or a partial bucket where the program accepts n_tokens < bucket)."""
        plan = []
        left = n
        buckets = [e for e in self.proto.prefill if e.tokens > 1]
        while left > 0:
            if left == 1 or not buckets:
                plan.append((self.proto.decode, 1))
                left -= 1
                continue
            fit = [e for e in buckets if e.tokens <= left]
            if self.proto.prefill_partial:
                big = buckets[-1]
                if left >= big.tokens:
                    plan.append((big, big.tokens))
                    left -= big.tokens
                else:
                    e = next(e for e in buckets if e.tokens >= left)
                    plan.append((e, left))
                    left = 0
            elif fit:
                e = fit[-1]
                plan.append((e, e.tokens))
                left -= e.tokens
            else:
                plan.append((self.proto.decode, 1))
                left -= 1
        return plan

    def _run(self, entry: Entry, ids: list[int], flags: int) -> None:
        io = self.buffers["io"]
        t = self.proto.tokens_in
        if len(ids) > t.count:
            raise AccllmError(f"{len(ids)} tokens in one run; the I/O buffer holds {t.count}")
        vocab = self.proto.vocab_size
        if any(not 0 <= i < vocab for i in ids):
            bad = next(i for i in ids if not 0 <= i < vocab)
            raise AccllmError(f"token id {bad} is outside the vocabulary (0..{vocab - 1})")
        io.upload(np.asarray(ids, dtype=t.dtype), t.offset)
        dev = self.device
        for name, buf in self.buffers.items():     # every run: a reset (timeout) may clear registers
            dev.set_arg(name, buf)
        dev.set_arg("program_len", entry.offset + entry.length)
        dev.set_arg("position", self.position)
        dev.set_arg("n_tokens", len(ids))
        dev.set_arg("flags", flags)
        if "entry" in dev.args:
            dev.set_arg("entry", entry.offset)
        elif entry.offset:
            raise AccllmError("memmap.json puts an entry point at a non-zero instruction index but the register "
                              "map has no 'entry' argument")
        try:
            dev.start()
            code = dev.wait(self.timeout_s)
        except KeyboardInterrupt:
            # Ctrl-C: abort the run; the device is idle afterwards (rtl: the simulation ends)
            try:
                dev.reset()
            except Exception:
                pass
            raise
        if code != regmap.STATUS_OK:
            idx = dev.read_status()[1]
            dump = dev.dump_registers()
            raise AccllmError(f"{dev.backend} device stopped with status {code} "
                              f"({regmap.STATUS_NAMES.get(code, 'unknown')}) at instruction {idx} "
                              f"(position {self.position}, {len(ids)} tokens); registers: {dump}")
        c = dev.cycles()
        self.stats.runs += 1
        if c is None or self.stats.cycles is None:
            self.stats.cycles = None
        else:
            self.stats.cycles += c
        self._last_cycles = c
        self.position += len(ids)

    def _read_logits(self, rows: int = 1) -> np.ndarray:
        s = self.proto.logits_out
        dt = np.dtype(s.dtype)
        raw = self.buffers["io"].download(rows * s.count * dt.itemsize, s.offset)
        x = np.frombuffer(raw, dtype=dt).reshape(rows, s.count).astype(np.float32)
        if dt.kind in "iu":
            x *= s.scale
        return x[:, :self.proto.vocab_size]

    def _read_argmax(self) -> int:
        s = self.proto.argmax_out
        dt = np.dtype(s.dtype)
        return int(np.frombuffer(self.buffers["io"].download(dt.itemsize, s.offset), dtype=dt)[0])

    def feed(self, ids: list[int], *, want: str = "logits") -> np.ndarray | int | None:
        """Append *ids* at the current position. want: "logits" → float logits of the last token
        [vocab]; "argmax" → the device's argmax token of the last token; "all" → logits of every
        token [n, vocab]; None → nothing read back."""
        if not ids:
            raise AccllmError("no tokens to feed")
        self._check_position(len(ids))
        if want == "logits" and len(ids) > 1 and self.proto.logits_rows == "all":
            # only the last token's row is needed: the rest as a run without lm_head
            self.feed(ids[:-1], want=None)
            return self.feed(ids[-1:], want="logits")
        plan = self._plan(len(ids))
        out_rows = []
        i = 0
        for k, (entry, n) in enumerate(plan):
            last = k == len(plan) - 1
            chunk = list(ids[i:i + n])
            i += n
            if want == "all":
                if self.proto.logits_rows == "all" or n == 1:
                    self._run(entry, chunk, FLAG_LOGITS)
                    out_rows.append(self._read_logits(n if self.proto.logits_rows == "all" else 1))
                else:                       # the program writes only the last row: go token by token
                    for tok in chunk:
                        self._run(self.proto.decode, [tok], FLAG_LOGITS)
                        out_rows.append(self._read_logits(1))
                continue
            if not last or want is None:
                self._run(entry, chunk, 0)
            elif want == "argmax" and self.proto.argmax_out is not None:
                self._run(entry, chunk, FLAG_ARGMAX)
                return self._read_argmax()
            else:
                self._run(entry, chunk, FLAG_LOGITS)
                rows = n if self.proto.logits_rows == "all" else 1
                lg = self._read_logits(rows)[-1]
                return int(np.argmax(lg)) if want == "argmax" else lg
        if want == "all":
            return np.concatenate(out_rows, axis=0)
        return None

    # ---- generation ------------------------------------------------------------------------------
    def generate(self, prompt, max_new_tokens: int = 32, sampling: Sampling | None = None,
                 stop_at_eos: bool = True, stop_ids: list[int] | None = None):
        """Yield generated token ids one by one (prompt: text or a list of ids). self.stats is
        filled as it goes (ttft_s, decode_tokens_per_s, cycles)."""
        if max_new_tokens < 1:
            raise AccllmError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        if not ids:
            raise AccllmError("the prompt is empty (no tokens)")
        sampling = sampling or Sampling()
        sampler = Sampler(sampling)
        stops = set(stop_ids or [])
        if stop_at_eos and self.eos_token_id is not None:
            stops.add(int(self.eos_token_id))
        self.reset()
        st = self.stats = Stats(prompt_tokens=len(ids))
        want = "argmax" if sampling.greedy else "logits"
        t0 = time.perf_counter()
        out = self.feed(ids, want=want)
        tok = out if isinstance(out, int) else sampler(out)
        st.ttft_s = time.perf_counter() - t0
        st.prefill_cycles = st.cycles
        st.new_tokens = 1
        yield tok
        t1 = time.perf_counter()
        while st.new_tokens < max_new_tokens and tok not in stops:
            out = self.feed([tok], want=want)
            tok = out if isinstance(out, int) else sampler(out)
            st.new_tokens += 1
            st.decode_s = time.perf_counter() - t1
            # kept current after every step, so an interrupted generation reports what it did
            st.decode_cycles = None if st.cycles is None else st.cycles - st.prefill_cycles
            yield tok
        st.decode_s = time.perf_counter() - t1
        st.decode_cycles = None if st.cycles is None else st.cycles - st.prefill_cycles

    # ---- lifetime --------------------------------------------------------------------------------
    def close(self) -> None:
        if getattr(self, "closed", False):
            return
        self.closed = True
        try:
            for b in list(getattr(self, "buffers", {}).values()):
                self.device.free(b)
        finally:
            self._session_cm.__exit__(None, None, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class DeviceScorer:
    """algo.eval Scorer through a Runtime: one session at a time (the device has one KV region)."""

    def __init__(self, runtime: Runtime, name: str | None = None):
        self.rt = runtime
        self.name = name or f"{runtime.device.backend}"
        self._current = 0

    def new_session(self):
        self._current += 1
        self.rt.reset()
        reads = getattr(self.rt.device, "spatten_reads", None)       # the functional model counts SpAtten's reads
        return {"id": self._current, "reads0": dict(reads) if reads is not None else None}

    def session_stats(self, session) -> dict | None:
        """SpAtten's KV reads saved in this session (functional model only; None elsewhere)."""
        r1 = getattr(self.rt.device, "spatten_reads", None)
        r0 = session.get("reads0")
        if r1 is None or r0 is None or not r1["kv_base"] - r0["kv_base"]:
            return None
        from algo.spatten import read_savings
        return read_savings({k: r1[k] - r0[k] for k in r1})

    def forward(self, session, ids):
        if session["id"] != self._current:
            raise AccllmError("DeviceScorer: only the newest session can be used (one KV region per device)")
        import torch
        lst = [int(i) for i in ids.reshape(-1).tolist()]
        return torch.from_numpy(np.ascontiguousarray(self.rt.feed(lst, want="all")))


def open_runtime(package_dir, backend: str = "emu", *, hw=None, owner: str = "accllm", wait_s: float = 0.0,
                 timeout_s: float | None = None, **device_kw) -> Runtime:
    """Open a device of *backend* for the package's hardware configuration and load the package."""
    from hw.config import hw_from_dict
    from host.backends import open_device
    m = read_package_manifest(package_dir)
    if hw is None:
        if "hw" not in m:
            raise AccllmError(f"package {package_dir} was not compiled for hardware (no 'hw' in manifest.json); "
                              f"run compile-model with --hw sim-small or u280")
        hw = hw_from_dict(m["hw"])
    if backend == "rtl":
        from sim.rtlsim.device import check_program_supported
        check_program_supported(package_dir)
    dev = open_device(backend, hw, **device_kw)
    try:
        rt = Runtime(package_dir, dev, owner=owner, wait_s=wait_s, timeout_s=timeout_s)
    except BaseException:
        dev.close()
        raise
    rt._owns_device = True
    orig_close = rt.close

    def close():
        try:
            orig_close()
        finally:
            dev.close()
    rt.close = close
    return rt
