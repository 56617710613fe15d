"""`mixed_precision: auto`: train in the precision this machine runs fastest, found by measuring it.

A CPU's flags do not say whether bf16 pays: on one Xeon with AVX512-BF16 (no AMX) a bf16 product ran at 0.6x the
fp32 rate, on another CPU 3.5x. So on a CPU with native bf16, `auto` times the model's own matrix products (the
projections of a decoder layer and the output layer, at the run's token count) in fp32 and under bf16 autocast,
about a second in all, and trains in the faster. The rates are cached per machine (processor, torch version,
threads, shapes) in `<cache root>/precision.json` (`LLM_PLAYGROUND_CACHE`, default `~/.cache/llm-playground`), so
later runs start without measuring; a corrupt or foreign cache file is ignored and rewritten.

Only precisions the machine runs are candidates: bf16 where the CPU has native bf16 (AVX512-BF16 or AMX), never
fp16 on a CPU (accelerate runs no fp16 autocast there, so it would silently be fp32). Products too small for a
half precision to pay (tiny models) train in fp32 without measuring. On a GPU, `auto` is bf16 where the GPU
supports it, else fp32, without measuring.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from app.sft.atomic import write_text
from app.sft.paths import cache_root

logger = logging.getLogger(__name__)

PROBE_SECONDS = 1.0
"""Time spent timing the products, all precisions together (kernel warm-up not counted)."""
MAX_PROBE_TOKENS = 1024
"""Rows of the timed products: `batch_size x max_seq_length`, at most this (rates level off well before)."""
MAX_CALL_FLOPS = 1e9
"""One timed call does at most this much work (fewer rows for very wide products, e.g. the output layer)."""
MIN_PRODUCT_FLOPS = 1e8
"""Below this (the largest product of a forward pass), autocast's casts cost more than bf16 saves: fp32."""
CACHE_FILE = "precision.json"
CACHE_FORMAT = "llm-playground mixed-precision probe, version 1"
_MAX_CACHE_ENTRIES = 64
_MAX_REPEATS = 50

Precision = Literal["bf16", "fp16"] | None


@dataclass(frozen=True)
class Product:
    """`count` matrix products [tokens, in_features] @ [in_features, out_features] of one forward pass."""

    tokens: int
    in_features: int
    out_features: int
    count: float = 1.0

    @property
    def flops(self) -> float:
        """Floating-point operations of one product (a multiply and an add per term)."""
        return 2.0 * self.tokens * self.in_features * self.out_features


@dataclass(frozen=True)
class PrecisionChoice:
    """The mixed precision a run trains in, how it was chosen, and the measured rates (GFLOP/s) if any."""

    mixed_precision: Precision
    source: Literal["config", "measured", "cached", "rule"]
    """`config`: set explicitly; `measured`/`cached`: `auto` by timing (now, or from the cache); `rule`: `auto`
    without timing (a GPU, a CPU without native bf16, tiny products)."""
    reason: str
    gflops: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """`bf16`, `fp16` or `fp32`."""
        return self.mixed_precision or "fp32"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe, as recorded in `training_summary.json` under `mixed_precision`."""
        return {**asdict(self), "mixed_precision": self.name}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrecisionChoice:
        """The choice `to_dict` wrote (`KeyError`/`TypeError` for anything else)."""
        name = data["mixed_precision"]
        return cls(None if name == "fp32" else name, data["source"], data["reason"], dict(data.get("gflops") or {}))

    def describe(self) -> str:
        """One line: the choice, how, and the rates."""
        rates = ", ".join(f"{name} {rate:.0f} GFLOP/s" for name, rate in self.gflops.items())
        how = {"measured": "measured", "cached": "measured earlier"}.get(self.source, "")
        detail = f"{how}: {rates}" if rates else self.reason
        setting = "mixed_precision" if self.source == "config" else "mixed_precision auto:"
        return f"{setting} {self.name} ({detail})"


def model_products(model_config: Any, tokens: int) -> list[Product]:
    """The distinct matrix products of one forward pass of a decoder LM with `model_config` (a transformers
    config) on `tokens` rows: attention and MLP projections of every layer, and the output layer."""
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    hidden = int(cfg.hidden_size)
    heads = int(getattr(cfg, "num_attention_heads", None) or 1)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    intermediate = int(getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * hidden)
    layers = int(cfg.num_hidden_layers)
    counts: dict[tuple[int, int], float] = {}
    for shape, count in (
        ((hidden, heads * head_dim), layers),  # q
        ((hidden, kv_heads * head_dim), 2 * layers),  # k, v
        ((heads * head_dim, hidden), layers),  # o
        ((hidden, intermediate), 2 * layers),  # gate, up (gated MLPs, the common case)
        ((intermediate, hidden), layers),  # down
        ((hidden, int(cfg.vocab_size)), 1),  # the output layer
    ):
        counts[shape] = counts.get(shape, 0) + count
    products = []
    for (n_in, n_out), count in counts.items():
        rows = max(16, min(tokens, int(MAX_CALL_FLOPS / (2 * n_in * n_out))))
        products.append(Product(rows, n_in, n_out, count * tokens / rows))
    return products


def measure_rates(
    products: Iterable[Product],
    precisions: Iterable[str] = ("fp32", "bf16"),
    seconds: float = PROBE_SECONDS,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """GFLOP/s of a forward pass's products in each precision (fp32 inputs and weights, bf16 through CPU
    autocast as in training), timing the precisions alternately, the fastest of repeated calls per product.

    Products are timed largest share of the work first; once `seconds` are spent (a slow, emulated precision)
    the rest are left out, for every precision alike. `clock` times the calls (`time.process_time`: FLOPs per
    CPU-second of this process, which other processes on a shared machine disturb less than wall time)."""
    import torch

    products = sorted(products, key=lambda product: product.count * product.flops, reverse=True)
    precisions = list(precisions)
    slot = seconds / max(len(products) * len(precisions), 1)
    generator = torch.Generator().manual_seed(0)  # leaves the global random state alone
    spent, work = dict.fromkeys(precisions, 0.0), 0.0
    started = time.perf_counter()
    for product in products:
        x = torch.randn(product.tokens, product.in_features, generator=generator)
        w = torch.randn(product.out_features, product.in_features, generator=generator)
        for precision in precisions:
            spent[precision] += product.count * _time_product(x, w, precision, slot, clock)
        work += product.count * product.flops
        if time.perf_counter() - started > seconds:
            break
    return {precision: round(work / seconds_spent / 1e9, 1) for precision, seconds_spent in spent.items()}


def _time_product(x: Any, w: Any, precision: str, seconds: float, clock: Callable[[], float]) -> float:
    """The fastest of repeated `x @ w.T` calls, repeating for about `seconds` (one call if that takes longer)."""
    import torch
    import torch.nn.functional as F

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    autocast = (
        torch.autocast("cpu", dtype=dtypes[precision]) if precision in dtypes else contextlib.nullcontext()
    )
    best, started, repeats = math.inf, time.perf_counter(), 0
    with torch.no_grad(), autocast:
        while repeats == 0 or (repeats < _MAX_REPEATS and time.perf_counter() - started < seconds):
            call = clock()
            F.linear(x, w)
            best = min(best, clock() - call)
            repeats += 1
    return best


def choose_mixed_precision(
    *,
    cuda: bool,
    bf16_supported: bool,
    model_config: Any | Callable[[], Any] | None,
    tokens: int,
    seconds: float | None = None,
    cache_path: Path | None = None,
) -> PrecisionChoice:
    """What `mixed_precision: auto` trains in on this machine (see the module docstring); never a precision the
    machine cannot run. `model_config` (a transformers config, or a function returning one, called only when the
    shapes are needed) gives the shapes to time (None: unknown, fp32) for `seconds` (default `PROBE_SECONDS`);
    the rates are read from and stored in `cache_path` (default: `precision.json` in the library's cache folder)."""
    if cuda:
        if bf16_supported:
            return PrecisionChoice("bf16", "rule", "the GPU supports bf16")
        return PrecisionChoice(None, "rule", "the GPU has no bf16")
    if not bf16_supported:
        return PrecisionChoice(None, "rule", "this CPU has no native bf16: no AVX512-BF16 or AMX")
    if callable(model_config):
        model_config = model_config()
    if model_config is None:
        return PrecisionChoice(None, "rule", "the base model's shapes are not known here (not available locally)")
    products = model_products(model_config, max(1, min(tokens, MAX_PROBE_TOKENS)))
    largest = max(product.flops for product in products)
    if largest < MIN_PRODUCT_FLOPS:
        return PrecisionChoice(
            None, "rule", f"the model's products are too small for bf16 to pay (largest {largest / 1e6:.1f} MFLOP)"
        )
    path = cache_path if cache_path is not None else default_cache_path()
    key = machine_key(products)
    rates, source = cached_rates(path, key, ("fp32", "bf16")), "cached"
    if rates is None and _launched_processes() > 1:  # measuring on each could disagree (and share the cores)
        return PrecisionChoice(
            None, "rule", "several processes were launched and this machine has no cached measurement yet "
            "(a one-process run measures and caches it)"
        )
    if rates is None:
        seconds = PROBE_SECONDS if seconds is None else seconds
        rates, source = measure_rates(products, ("fp32", "bf16"), seconds), "measured"
        store_rates(path, key, rates)
    best = max(rates, key=lambda name: rates[name])
    reason = f"{best} multiplies the model's matrices faster on this machine"
    return PrecisionChoice(None if best == "fp32" else best, source, reason, dict(rates))  # type: ignore[arg-type]


def _launched_processes() -> int:
    """Processes of this run as torchrun / accelerate launch set them (`WORLD_SIZE`), 1 otherwise."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


# --- the cache ---------------------------------------------------------------------------------------------------


def default_cache_path() -> Path:
    """`precision.json` in the library's cache folder (`LLM_PLAYGROUND_CACHE`, default `~/.cache/llm-playground`)."""
    return cache_root() / CACHE_FILE


def machine_key(products: Iterable[Product]) -> dict[str, Any]:
    """What a measurement depends on: the processor (name and flags), the torch build and threads, and the
    products timed."""
    import torch

    return {
        "processor": processor_name(),
        "cpu_flags": _cpu_flags_digest(),  # virtual machines often show one model name for different CPUs
        "machine": platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "products": [[p.tokens, p.in_features, p.out_features, round(p.count, 3)] for p in products],
    }


def processor_name() -> str:
    """The processor's model name (`/proc/cpuinfo` on Linux, else `platform`)."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine() or "unknown"


def _cpu_flags_digest() -> str:
    """A short hash of the processor's feature flags (`/proc/cpuinfo`), or "" where there are none."""
    flags = _cpuinfo_field("flags", "Features")
    return hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:16] if flags else ""


def _cpuinfo_field(*names: str) -> str | None:
    """The first non-empty value of one of `names` in `/proc/cpuinfo`, or None (not Linux, unreadable)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            name, _, value = line.partition(":")
            if name.strip() in names and value.strip():
                return value.strip()
    return None


def cached_rates(path: Path, key: Mapping[str, Any], precisions: Iterable[str]) -> dict[str, float] | None:
    """The stored rates for `key` covering every one of `precisions`, or None (none stored, or no usable file)."""
    entries = _read_entries(path) or []
    for entry in entries:
        if entry["key"] == key and all(name in entry["gflops"] for name in precisions):
            return {name: entry["gflops"][name] for name in precisions}
    return None


def store_rates(path: Path, key: Mapping[str, Any], rates: Mapping[str, float]) -> None:
    """Add (or replace) the rates for `key`, keeping the file's other valid entries; a corrupt or foreign file is
    replaced. Written atomically; a cache folder that cannot be written only warns (the choice stands)."""
    entries = [entry for entry in _read_entries(path) or [] if entry["key"] != key]
    entries = [*entries, {"key": dict(key), "gflops": dict(rates)}][-_MAX_CACHE_ENTRIES:]
    data = json.dumps({"format": CACHE_FORMAT, "entries": entries}, indent=1)
    try:
        write_text(path, data)
    except OSError as error:
        logger.warning("Could not cache the precision measurement in %s: %s", path, error)


def _read_entries(path: Path) -> list[dict[str, Any]] | None:
    """The entries of a valid cache file; None when it is missing, unreadable, corrupt or not ours."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("entries"), list):
        return None
    entries = data["entries"]
    if not all(_valid_entry(entry) for entry in entries):
        return None
    return entries


def _valid_entry(entry: Any) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get("key"), dict):
        return False
    rates = entry.get("gflops")
    return isinstance(rates, dict) and bool(rates) and all(
        isinstance(name, str) and isinstance(rate, (int, float)) and not isinstance(rate, bool)
        and math.isfinite(rate) and rate > 0
        for name, rate in rates.items()
    )
