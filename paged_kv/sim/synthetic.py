"""Synthetic request traces built to stress the block allocator.

The bundled Azure trace gives realistic length distributions, but a single
recorded hour is a poor test of the failure modes a paged KV cache has to survive.
`synthetic_trace` draws traces, from a seed, that push on those modes on purpose:

* **Bursts** fill the pool. Arrivals are a Poisson process whose rate jumps by
  ``burst_factor`` for short periods (a two-state Markov-modulated Poisson
  process), so hundreds of requests can land within seconds and admission,
  preemption and the free-block watermark all get exercised.
* **Heavy-tailed lengths.** Prompt and output lengths are lognormal, as measured
  LLM traces are: most requests are short, a few are much longer.
* **Very long outliers** land near ``max_seq_len``: a small fraction of prompts
  is drawn from ``outlier_tokens`` (by default 8k-16k tokens), and with
  ``max_total_tokens`` set they are clipped to just fit. These are the requests
  that need a whole block table and are the first to be preempted.
* **Cancellations** free blocks mid-decode: a fraction of clients disconnect
  after a uniformly random number of generated tokens (`Trace.cancel_after`),
  so blocks return to the pool while the batch around them keeps growing.

Everything is vectorized numpy: 100k requests take a few tens of milliseconds.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

import numpy as np

from paged_kv.errors import TraceError
from paged_kv.sim.trace import _NS_PER_TICK, _TICKS_PER_S, NOT_CANCELLED, Trace

# Lognormal draws with a large sigma can reach inf; capping before the cast to
# int64 keeps the conversion defined. No cache holds 2**31 tokens per sequence.
_MAX_TOKENS = 2**31 - 1

# One independent random stream per aspect of the trace (see `synthetic_trace`).
_STREAMS = ("arrivals", "context", "generated", "outliers", "cancellations")


def synthetic_trace(
    num_requests: int,
    *,
    seed: int = 0,
    rate_per_s: float = 10.0,
    burst_factor: float = 16.0,
    burst_fraction: float = 0.1,
    burst_mean_s: float = 2.0,
    context_median: int = 1000,
    context_sigma: float = 1.0,
    generated_median: int = 200,
    generated_sigma: float = 0.8,
    outlier_fraction: float = 0.01,
    outlier_tokens: tuple[int, int] = (8192, 16384),
    cancel_fraction: float = 0.05,
    max_total_tokens: int | None = None,
) -> Trace:
    """Draw a bursty, heavy-tailed request trace with outliers and cancellations.

    The same arguments give the same trace, bit for bit. Each aspect (arrivals,
    prompt lengths, output lengths, outliers, cancellations) draws from its own
    stream spawned from ``seed``, so changing one knob, say ``cancel_fraction``,
    leaves the columns it does not touch unchanged and an A/B comparison isolates
    that knob.

    Args:
        num_requests: Number of requests (rows); 0 gives an empty trace.
        seed: Non-negative integer seed.
        rate_per_s: Arrival rate, requests per second, outside bursts.
        burst_factor: How many times higher the rate is during a burst (>= 1).
            The long-run mean rate is
            ``rate_per_s * (1 + burst_fraction * (burst_factor - 1))``.
        burst_fraction: Fraction of the time spent in bursts, in [0, 1]. 0 or 1
            (or ``burst_factor == 1``) gives a plain Poisson process. With the
            defaults the inter-arrival gaps have a coefficient of variation near
            1.9, against 1 for Poisson arrivals.
        burst_mean_s: Mean length of a burst in seconds; burst and calm periods
            have exponential lengths, calm ones averaging
            ``burst_mean_s * (1 - burst_fraction) / burst_fraction``.
        context_median: Median prompt length in tokens (>= 1).
        context_sigma: Sigma of the prompt length's lognormal (of its log), >= 0;
            0 makes every prompt ``context_median`` long.
        generated_median: Median output length in tokens (>= 1).
        generated_sigma: Sigma of the output length's lognormal, >= 0.
        outlier_fraction: Fraction of requests, in [0, 1], whose prompt is
            instead drawn uniformly from ``outlier_tokens``. Exactly
            ``round(outlier_fraction * num_requests)`` requests, at random rows.
        outlier_tokens: Inclusive ``(low, high)`` prompt-length range of the
            outliers, ``1 <= low <= high``.
        cancel_fraction: Fraction of requests, in [0, 1], that are cancelled:
            exactly ``round(cancel_fraction * num_requests)`` at random rows,
            each after a number of generated tokens uniform in
            ``[0, generated_tokens)``.
        max_total_tokens: If given (>= 2), prompts are clipped to
            ``max_total_tokens - 1`` and outputs so that
            ``context + generated <= max_total_tokens``: pass a cache's
            ``max_seq_len`` and no request is truncated or skipped, while the
            outliers sit right at the limit.

    Returns:
        A `Trace` starting at ``arrival_s[0] == 0``, with arrival times on the
        100 ns grid of the CSV format (so `Trace.to_csv` -> `load_trace` is
        exact), every prompt and every output at least 1 token (so every request
        reaches decode and any of them can be cancelled), and ``cancel_after``
        filled in.

    Raises:
        TraceError: A parameter out of range or of the wrong type; the message
            names the parameter and its value.
    """
    _check_int("num_requests", num_requests, minimum=0)
    _check_int("seed", seed, minimum=0)
    _check_real("rate_per_s", rate_per_s, 0, strict=True)
    _check_real("burst_factor", burst_factor, 1, strict=False)
    _check_fraction("burst_fraction", burst_fraction)
    _check_real("burst_mean_s", burst_mean_s, 0, strict=True)
    _check_int("context_median", context_median, minimum=1)
    _check_real("context_sigma", context_sigma, 0, strict=False)
    _check_int("generated_median", generated_median, minimum=1)
    _check_real("generated_sigma", generated_sigma, 0, strict=False)
    _check_fraction("outlier_fraction", outlier_fraction)
    _check_outlier_tokens(outlier_tokens)
    _check_fraction("cancel_fraction", cancel_fraction)
    if max_total_tokens is not None:
        # 2, not 1: a request needs one prompt token and one generated token.
        _check_int("max_total_tokens", max_total_tokens, minimum=2)

    n = int(num_requests)
    streams = dict(zip(_STREAMS, (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(len(_STREAMS)))))

    arrival = _arrivals(streams["arrivals"], n, float(rate_per_s), float(burst_factor), float(burst_fraction),
                        float(burst_mean_s))
    context = _lognormal_tokens(streams["context"], n, int(context_median), float(context_sigma))
    generated = _lognormal_tokens(streams["generated"], n, int(generated_median), float(generated_sigma))

    rng = streams["outliers"]
    outliers = rng.choice(n, size=_count(outlier_fraction, n), replace=False)
    low, high = (int(v) for v in outlier_tokens)
    context[outliers] = rng.integers(low, high, size=outliers.size, endpoint=True)

    if max_total_tokens is not None:
        # Prompt first, keeping room for one output token, then the output in what is left.
        context = np.minimum(context, max_total_tokens - 1)
        generated = np.minimum(generated, max_total_tokens - context)

    # After the clipping, so that every cancel point is inside the final output.
    rng = streams["cancellations"]
    cancelled = rng.choice(n, size=_count(cancel_fraction, n), replace=False)
    cancel_after = np.full(n, NOT_CANCELLED, dtype=np.int64)
    cancel_after[cancelled] = rng.integers(0, generated[cancelled])

    return Trace(arrival, context, generated, cancel_after=cancel_after)


def _arrivals(rng: np.random.Generator, n: int, rate: float, factor: float, fraction: float,
              burst_mean_s: float) -> np.ndarray:
    """Arrival times of a two-state Markov-modulated Poisson process, first at 0.

    Vectorized by time rescaling: a Poisson process of rate lambda(t) is a unit-rate
    one read through the inverse of Lambda(t) = integral of lambda. Lambda is
    piecewise linear over the calm/burst periods, so its inverse is one `np.interp`
    over the period boundaries.
    """
    if n == 0:
        return np.empty(0)
    # Unit-rate arrival "work" with the first request at 0, like a recorded trace.
    work = np.concatenate(([0.0], np.cumsum(rng.standard_exponential(n - 1))))
    if fraction in (0.0, 1.0) or factor == 1.0:
        seconds = work / (rate * factor if fraction == 1.0 else rate)
    else:
        calm_mean_s = burst_mean_s * (1.0 - fraction) / fraction
        per_cycle = rate * (calm_mean_s + factor * burst_mean_s)  # expected work of one calm+burst cycle
        # Start in a burst with the stationary probability, so the first seconds
        # are not always calm; periods are exponential, hence memoryless.
        skip_first_calm = bool(rng.random() < fraction)
        lengths, rates = [], []
        covered = 0.0
        while covered <= work[-1]:
            # Enough cycles for the remaining work with room to spare; the loop
            # only repeats when a run of short periods falls behind.
            cycles = math.ceil(1.25 * (work[-1] - covered) / per_cycle) + 4
            chunk = rng.standard_exponential((cycles, 2)) * (calm_mean_s, burst_mean_s)
            chunk_rates = np.broadcast_to((rate, rate * factor), chunk.shape)
            lengths.append(chunk.ravel())
            rates.append(chunk_rates.ravel())
            covered += float(chunk.ravel() @ chunk_rates.ravel())
        length = np.concatenate(lengths)[skip_first_calm:]
        period_rate = np.concatenate(rates)[skip_first_calm:]
        boundary_s = np.concatenate(([0.0], np.cumsum(length)))
        boundary_work = np.concatenate(([0.0], np.cumsum(length * period_rate)))
        seconds = np.interp(work, boundary_work, boundary_s)
    # Snap to the CSV's 100 ns ticks with the arithmetic `load_trace` uses, so a
    # written and re-read trace compares equal. Rounding is monotone: order is kept.
    ticks = np.round(seconds * _TICKS_PER_S).astype(np.int64)
    return (ticks * _NS_PER_TICK) / 1e9


def _lognormal_tokens(rng: np.random.Generator, n: int, median: int, sigma: float) -> np.ndarray:
    # The median of a lognormal is exp(mu), so mu = log(median).
    draws = rng.lognormal(mean=math.log(median), sigma=sigma, size=n)
    return np.rint(np.clip(draws, 1, _MAX_TOKENS)).astype(np.int64)


def _count(fraction: float, n: int) -> int:
    return int(round(float(fraction) * n))


def _is_int(value: object) -> bool:
    # bool is an int subclass, but True requests is a bug, not a count.
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _check_int(name: str, value: Any, minimum: int, *, where: str = "synthetic_trace") -> None:
    """`TraceError` unless ``value`` is an integer (not a bool) >= ``minimum``; ``where``
    names the workload builder the argument was given to."""
    if not _is_int(value) or value < minimum:
        raise TraceError(f"{where}: {name}={value!r} must be an integer >= {minimum}")


def _check_real(name: str, value: Any, minimum: float, *, strict: bool, where: str = "synthetic_trace") -> None:
    # The type check comes first so a string never reaches a comparison. NaN and
    # inf are refused: an infinite rate or duration has no trace to draw.
    rule = f"> {minimum}" if strict else f">= {minimum}"
    ok = _is_real(value) and math.isfinite(value) and (value > minimum if strict else value >= minimum)
    if not ok:
        raise TraceError(f"{where}: {name}={value!r} must be a finite number {rule}")


def _check_fraction(name: str, value: Any) -> None:
    if not _is_real(value) or not 0.0 <= value <= 1.0:
        raise TraceError(f"synthetic_trace: {name}={value!r} must be a fraction in [0, 1]")


def _check_outlier_tokens(value: Any) -> None:
    ok = (isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) for v in value)
          and 1 <= value[0] <= value[1])
    if not ok:
        raise TraceError(
            f"synthetic_trace: outlier_tokens={value!r} must be a (low, high) pair of integers with 1 <= low <= high"
        )


__all__ = ["synthetic_trace"]
