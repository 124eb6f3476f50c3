"""The design-space sweep behind ``accllm sweep``: a grid over recipe keys and hardware configurations,
each point compiled into a package (once: packages are cached by content), projected by the cycle model
(sim.cycle.project, as ``accllm perf``) and scored for perplexity (``accllm eval --package``); the
points run as Ray tasks or one after another in this process.

Grid keys: a recipe key (``weight_bits``, ``window``, ...), ``hw.KEY`` for a hardware configuration key
(``hw.clock_mhz``, ...), ``recipe`` for a named recipe and ``hw`` for a hardware preset. A point's recipe
is its named recipe, then --recipe-file, then --set, then its recipe keys; its hardware configuration
is its preset, then --hw-set, then its ``hw.`` keys.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from algo.common import AccllmError

HW_PREFIX = "hw."
TIMING_KEYS = ("seconds", "compile_seconds", "eval_seconds")     # what differs between two runs of a point


# --- the grid -------------------------------------------------------------------------------------

def _hw_keys() -> list[str]:
    from dataclasses import fields
    from hw.config import HWConfig
    return [f.name for f in fields(HWConfig) if f.name not in ("name", "extra")]


def _recipe_keys() -> list[str]:
    from algo.recipe import KEYS
    return [k for k in KEYS if k != "name"]


def accepted_keys() -> str:
    from algo.recipe import PRESETS as RECIPES
    from hw.config import PRESETS as HWS
    return (f"recipe keys {', '.join(_recipe_keys())}; hardware keys {', '.join(HW_PREFIX + k for k in _hw_keys())}; "
            f"recipe (a named recipe: {', '.join(RECIPES)}); hw (a preset: {', '.join(HWS)})")


def check_key(key: str, origin: str) -> None:
    known = ["recipe", "hw"] + _recipe_keys() + [HW_PREFIX + k for k in _hw_keys()]
    if key in known:
        return
    import difflib
    near = [k for k in known if k.startswith(key) or key in k.split("_")][:1] or \
        difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f" (did you mean {near[0]}?)" if near else ""
    if key == "name":
        hint = " (a named recipe is swept with the key recipe)"
    raise AccllmError(f"{origin}: unknown grid key {key!r}{hint}; accepted: {accepted_keys()}")


def parse_grid(items: list[str]) -> list[tuple[str, list]]:
    """``--grid KEY=V1,V2`` options: (key, values as given) in order."""
    axes = []
    for item in items:
        if "=" not in item:
            raise AccllmError(f"--grid takes KEY=V1,V2,..., got {item!r}")
        key, raw = (x.strip() for x in item.split("=", 1))
        check_key(key, f"--grid {key}")
        values = [v.strip() for v in raw.split(",")]
        if not raw or any(not v for v in values):
            raise AccllmError(f"--grid {item}: empty value; give KEY=V1,V2,... (a list-valued recipe key takes "
                              f"its lists from --grid-file)")
        axes.append((key, values))
    return axes


def load_grid_file(path: str) -> list[tuple[str, list]]:
    """A TOML grid: ``KEY = [V1, V2]`` (a single value is an axis of one), at the top level or under
    ``[grid]``; a table ``[hw]`` holds hw.KEY axes. Values keep their TOML types."""
    import tomllib
    p = Path(path)
    if not p.is_file():
        raise AccllmError(f"--grid-file {path} not found")
    try:
        data = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise AccllmError(f"--grid-file {p}: cannot parse it as TOML ({e})") from None
    if isinstance(data.get("grid"), dict):
        others = [k for k in data if k != "grid"]
        if others:
            raise AccllmError(f"--grid-file {p}: keys outside [grid] ({', '.join(others)}); put every axis in [grid]")
        data = data["grid"]
    axes = []

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            key = prefix + k
            if isinstance(v, dict):
                if key != "hw":
                    raise AccllmError(f"--grid-file {p}: table {key!r}: only [hw] (hardware keys) is a table; "
                                      f"accepted keys: {accepted_keys()}")
                walk(v, key + ".")
                continue
            check_key(key, f"--grid-file {p}: {key}")
            values = v if isinstance(v, list) else [v]
            if not values:
                raise AccllmError(f"--grid-file {p}: {key} = [] gives no values")
            axes.append((key, values))
    walk(data, "")
    return axes


def check_axes(axes: list[tuple[str, list]]) -> None:
    seen = set()
    for key, values in axes:
        if key in seen:
            raise AccllmError(f"grid key {key} is given twice (once per --grid or --grid-file axis)")
        seen.add(key)
        shown = [json.dumps(v, sort_keys=True) for v in values]
        dup = next((s for i, s in enumerate(shown) if s in shown[:i]), None)
        if dup is not None:
            raise AccllmError(f"grid key {key}: the value {dup} is given twice")


# --- points ---------------------------------------------------------------------------------------

@dataclass
class Base:
    """What every point starts from (the command's --model, --recipe, --recipe-file, --set, --hw, --hw-set)."""
    model: str
    recipe: str
    recipe_file: str | None = None
    sets: list = field(default_factory=list)
    hw: str = "u280"
    hw_sets: list = field(default_factory=list)


def _hw_text(key: str, v) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise AccllmError(f"hardware key {key} takes a number, got {v!r}")
    return str(v)


def resolve(base: Base, assignment: dict):
    """The validated recipe, hardware configuration and its overrides of one point; its settings (each
    grid key with the value it took, typed as the recipe or the configuration holds it)."""
    from algo.recipe import KEYS, load_recipe, recipe_from_dict
    from hw.config import load_hw
    recipe = load_recipe(assignment.get("recipe", base.recipe), base.recipe_file, base.sets)
    upd = {k: v for k, v in assignment.items() if k in KEYS}
    if upd:
        recipe = recipe_from_dict({**recipe.to_dict(), **upd})
    hw_sets = list(base.hw_sets) + [f"{k[len(HW_PREFIX):]}={_hw_text(k[len(HW_PREFIX):], v)}" for k, v in assignment.items()
                                    if k.startswith(HW_PREFIX)]
    hw = load_hw(assignment.get("hw", base.hw), hw_sets)
    settings = {}
    for k in assignment:
        settings[k] = recipe.name if k == "recipe" else hw.name if k == "hw" else \
            getattr(hw, k[len(HW_PREFIX):]) if k.startswith(HW_PREFIX) else getattr(recipe, k)
    return recipe, hw, hw_sets, settings


def check_values(base: Base, axes: list[tuple[str, list]]) -> None:
    """Each value of each axis over the base, so that a refusal names the one that is wrong."""
    for key, values in axes:
        for v in values:
            try:
                resolve(base, {key: v})
            except AccllmError as e:
                raise AccllmError(f"grid {key}={json.dumps(v) if not isinstance(v, str) else v}: {e}") from None


def package_key(model_id: str, recipe, hw) -> str:
    """The content key of a point's package: the model's weights, the recipe, the hardware configuration
    and the accllm sources that decide the package's bytes."""
    from host.build import sources_digest
    doc = {"model": model_id, "recipe": recipe.to_dict(), "hw": hw.to_dict(), "sources": sources_digest()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:20]


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:40] or "model"


def make_points(base: Base, axes: list[tuple[str, list]], *, data: list[str], ctx: int, chunks: int,
                prompt: int, context: int | None, cache_root: Path) -> list[dict]:
    """The points of the grid (the product of the axes, the last varying fastest), each a plain dict a
    Ray task takes (run_point)."""
    from algo.models import model_identity, model_shape
    from hw.build_rtl import cached_resources
    model_id = model_identity(base.model)
    try:
        shape = model_shape(base.model)
    except AccllmError:
        shape = None                      # a GGUF file: read from the package's model_config
    keys = [k for k, _ in axes]
    resources = {}
    points = []
    for i, combo in enumerate(itertools.product(*[vals for _, vals in axes])):
        recipe, hw, hw_sets, settings = resolve(base, dict(zip(keys, combo)))
        hw_json = hw.to_json()
        if hw_json not in resources:
            resources[hw_json] = cached_resources(hw)
        key = package_key(model_id, recipe, hw)
        points.append({
            "index": i, "settings": settings, "model": base.model, "recipe": recipe.to_dict(),
            "hw": hw.name, "hw_sets": hw_sets, "key": key,
            "package": str(cache_root / f"{_safe(Path(base.model).name)}-{key}"),
            "data": list(data), "ctx": ctx, "chunks": chunks, "prompt": prompt, "context": context,
            "shape": shape, "resources": resources[hw_json]})
    return points


# --- one point (runs in a Ray worker or in this process) ------------------------------------------

def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ensure_package(point: dict, recipe) -> bool:
    """The point's package in the cache, compiled (host.build.compile_model, written to a temporary
    directory and renamed) unless a verified one is there; whether it was compiled now."""
    import argparse
    import shutil
    from algo.common import file_lock
    from host.build import compile_model
    from quant.package import load_package
    d = Path(point["package"])
    with file_lock(d.parent / f".{d.name}.lock"):          # two sweeps making the same package take turns
        if d.is_dir():
            try:
                load_package(d)                            # format, version and every sha256
                return False
            except AccllmError as e:
                _log(f"the cached package {d} is unusable ({e}); compiling it again")
                shutil.rmtree(d)
        ns = argparse.Namespace(model=point["model"], recipe=recipe.name, recipe_file=None, sets=[], out=str(d),
                                hw=point["hw"], hw_sets=list(point["hw_sets"]), stop_step=None, start_step=None,
                                save_steps=False, package=None, no_progress=True, json=True, _json_document=None)
        compile_model(ns, recipe=recipe)                   # its --json document is kept in ns, not printed
    return True


def evaluate(point: dict) -> dict:
    """Perplexity of the package on each --data source ({source: ppl}), as ``accllm eval --package``."""
    import argparse
    from host import cmd_eval
    ns = argparse.Namespace(package=point["package"], backend=None, data=list(point["data"]), ctx=point["ctx"],
                            chunks=point["chunks"], stream=False, length=0, block=0, plot=None, model=point["model"],
                            recipe=None, recipe_file=None, sets=[], no_progress=True, json=True, _json_document=None)
    cmd_eval.run(ns)
    doc = json.loads(ns._json_document)
    return {r["data"]: r["ppl"] for r in doc.get("results", [doc])}


def _shape(point: dict, manifest: dict) -> dict:
    if point["shape"] is not None:
        return dict(point["shape"])
    c = manifest["model_config"]
    return dict(hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
                num_key_value_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
                head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
                vocab_size=c["vocab_size"], max_position_embeddings=c.get("max_position_embeddings", 4096),
                tie_word_embeddings=c.get("tie_word_embeddings", False))


def _error_text(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    msg = text[0] if text else ""
    return msg if isinstance(e, AccllmError) else f"{type(e).__name__}: {msg}".rstrip(": ")


def run_point(point: dict) -> dict:
    """Compile (or find in the cache), project and score one point. Never raises: a failure is the
    point's ``error`` (its traceback, for anything but an AccllmError, goes to stderr)."""
    t0 = time.time()
    rec = point["recipe"]
    out = dict(point["settings"])
    out.setdefault("recipe", rec["name"])
    out.setdefault("hw", point["hw"])
    try:
        from algo.recipe import recipe_from_dict
        from hw.config import load_hw
        from sim.cycle import project
        recipe = recipe_from_dict(rec)
        hw = load_hw(point["hw"], point["hw_sets"])
        compiled = ensure_package(point, recipe)
        t1 = time.time()
        man = json.loads((Path(point["package"]) / "manifest.json").read_text())
        fp = man["footprint"]
        perf = project(dict(_shape(point, man), name=point["model"]), recipe, hw, point["context"], point["prompt"])
        ppl = evaluate(point)
        t2 = time.time()
        out.update({
            "recipe_summary": recipe.summary(),
            "bits_per_weight": fp["bits_per_weight_blocks"],
            "bits_per_weight_linear": fp["bits_per_weight_linear"],
            "bits_per_weight_total": fp["bits_per_weight_total"],
            "bytes_per_token": perf["bytes_per_token"],
            "decode_tokens_per_s": perf["decode_tokens_per_s"],
            "prefill_tokens_per_s": perf["prefill_tokens_per_s"],
            "ttft_s": perf["ttft_s"],
            "roofline_tokens_per_s": perf["roofline_tokens_per_s"],
            "cycles_per_token": perf["cycles_per_token"],
            "rtl_decode_tokens_per_s": (perf.get("as_built") or {}).get("decode_tokens_per_s"),
            "ppl": ppl[point["data"][0]],
            "ppl_by_data": ppl,
            "resources": point["resources"],
            "package": point["package"],
            "package_key": point["key"],
            "compiled": compiled,
            "compile_seconds": round(t1 - t0, 3),
            "eval_seconds": round(t2 - t1, 3),
        })
    except Exception as e:                                 # the sweep goes on; KeyboardInterrupt does not
        if not isinstance(e, AccllmError):
            import traceback
            _log(f"point {point['index']} ({json.dumps(point['settings'])}) failed:\n{traceback.format_exc()}")
        out["error"] = _error_text(e)
    out["seconds"] = round(time.time() - t0, 3)
    return out


# --- running the points ---------------------------------------------------------------------------

def _bar(total: int, progress: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc="sweep", unit="point", file=sys.stderr, disable=not progress, dynamic_ncols=True)


def _failed(point: dict, error: str) -> dict:
    return {**point["settings"], "recipe": point["recipe"]["name"], "hw": point["hw"], "error": error}


def run_local(points: list[dict], progress: bool, runner=None) -> list[dict]:
    runner = runner or run_point
    out = []
    with _bar(len(points), progress) as bar:
        for p in points:
            out.append(runner(p))
            bar.update(1)
    return out


def _worker_env() -> dict:
    """Environment of the Ray workers: these accllm sources first on the path, the data and cache folders."""
    root = str(Path(__file__).resolve().parent.parent)
    env = {k: os.environ[k] for k in ("ACCLLM_DATA", "ACCLLM_CACHE", "XDG_CACHE_HOME", "HF_HOME") if k in os.environ}
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _probe(address: str, timeout_s: float = 10.0) -> None:
    """Refuse at once a HOST:PORT nobody listens on (Ray would retry for minutes); other forms (auto) are
    left to Ray."""
    import socket
    hostport = address.split("://", 1)[-1]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise AccllmError(f"--address {address}: no Ray cluster answers there ({e.strerror or e}); start one with "
                          f"`ray start --head` or run without --address (a local Ray) or with --local") from None


def run_ray(points: list[dict], progress: bool, workers: int | None = None, address: str | None = None) -> list[dict]:
    """Each point a Ray task of one CPU: on a local Ray of *workers* CPUs started (and stopped) here, or
    on the cluster at *address*."""
    try:
        import ray
    except ImportError:
        raise AccllmError("Ray is not installed (pip install ray==2.52.0, as in requirements.txt); "
                          "--local runs the sweep without it") from None
    import logging
    # (inherited by the processes of a local Ray) the points use no accelerator; no metrics agent (there is
    # no dashboard: its processes would log connection failures); no usage statistics sent
    for k, v in (("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0"), ("RAY_enable_metrics_collection", "0"),
                 ("RAY_USAGE_STATS_ENABLED", "0")):
        os.environ.setdefault(k, v)
    kw = dict(log_to_driver=True, logging_level=logging.WARNING)
    if address:                  # a cluster's workers get the environment through Ray
        kw["runtime_env"] = {"env_vars": _worker_env()}
    else:                        # a local Ray's processes inherit this one's (workers already started are used)
        os.environ.update(_worker_env())
    if address:
        _probe(address)
    try:
        if address:
            ray.init(address=address, **kw)
        else:
            # "local": a new instance even where a cluster of `ray start` or RAY_ADDRESS would be found
            ray.init(address="local", num_cpus=workers, include_dashboard=False, object_store_memory=128 * 2**20, **kw)
    except Exception as e:
        where = f"join the Ray cluster at {address}" if address else "start a local Ray"
        raise AccllmError(f"cannot {where} ({_error_text(e)})") from None
    try:
        task = ray.remote(num_cpus=1, max_retries=0)(run_point)
        pending = {task.remote(p): i for i, p in enumerate(points)}
        out: list[dict | None] = [None] * len(points)
        with _bar(len(points), progress) as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    i = pending.pop(ref)
                    try:
                        out[i] = ray.get(ref)
                    except Exception as e:                 # the worker died (memory, a signal)
                        out[i] = _failed(points[i], _error_text(e))
                    bar.update(1)
        return out
    finally:
        ray.shutdown()


# --- results --------------------------------------------------------------------------------------

def mark_pareto(results: list[dict]) -> None:
    """``pareto``: true for each point no other point beats on both perplexity (lower) and projected decode
    tokens/s (higher); failed points have none."""
    ok = [r for r in results if "error" not in r]
    for r in ok:
        r["pareto"] = not any(q["ppl"] <= r["ppl"] and q["decode_tokens_per_s"] >= r["decode_tokens_per_s"]
                              and (q["ppl"] < r["ppl"] or q["decode_tokens_per_s"] > r["decode_tokens_per_s"])
                              for q in ok)


def label(settings_keys: list[str], r: dict) -> str:
    return " ".join(f"{k}={r[k]}" for k in settings_keys) or "base"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = json.dumps(v) if isinstance(v, list) else v
    return out


def csv_text(results: list[dict]) -> str:
    import csv
    import io
    rows = [_flat(r) for r in results]
    cols = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def plot_pareto(results: list[dict], settings_keys: list[str], title: str) -> bytes:
    import io
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in results if "error" not in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    front = sorted((r for r in ok if r.get("pareto")), key=lambda r: r["decode_tokens_per_s"])
    rest = [r for r in ok if not r.get("pareto")]
    if rest:
        ax.scatter([r["decode_tokens_per_s"] for r in rest], [r["ppl"] for r in rest], color="C0", alpha=0.6,
                   label="points")
    if front:
        ax.plot([r["decode_tokens_per_s"] for r in front], [r["ppl"] for r in front], color="C3", marker="o",
                drawstyle="steps-pre", label="Pareto front")
    for r in ok:
        ax.annotate(label(settings_keys, r), (r["decode_tokens_per_s"], r["ppl"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ppls = [r["ppl"] for r in ok]
    if ppls and max(ppls) > 4 * min(ppls):
        ax.set_yscale("log")
    ax.set_xlabel("projected decode tokens/s (cycle model)")
    ax.set_ylabel("perplexity")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    if ok:
        ax.legend(fontsize=8)
    failed = len(results) - len(ok)
    if failed:
        ax.text(0.99, 0.01, f"{failed} failed point(s) not shown", transform=ax.transAxes, ha="right",
                va="bottom", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def write_outputs(out_dir: str, doc: dict, settings_keys: list[str], title: str) -> dict:
    """results.json, results.csv and pareto.png in *out_dir*, each written atomically; their paths."""
    from algo.common import atomic_write_bytes, atomic_write_text
    d = Path(out_dir)
    files = {"json": d / "results.json", "csv": d / "results.csv", "plot": d / "pareto.png"}
    atomic_write_text(files["json"], json.dumps(doc, indent=1) + "\n")
    atomic_write_text(files["csv"], csv_text(doc["points"]))
    atomic_write_bytes(files["plot"], plot_pareto(doc["points"], settings_keys, title))
    return {k: str(v) for k, v in files.items()}
