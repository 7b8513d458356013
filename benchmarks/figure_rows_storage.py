"""Figure rows of the benchmarks that move pages out of one pool: to another process
(`bench_transfer.py`) and to the host and disk tiers (`bench_tiers.py`)."""

from __future__ import annotations

from _figure_format import Row, _pct, _x, get


def _transfer_rows(r: dict) -> list[Row]:
    out = []
    pages = get(r, "bench_transfer:pages")
    if pages:
        one = pages["one_sequence"]
        path = {"shm": "a shared-memory ring", "tcp": "TCP on loopback"}.get(pages.get("path", "tcp"), pages.get("path"))
        latency = one.get("latency_to_first_decode_step_ms")
        out.append((f"one sequence ({pages['sequence_mib']:g} MiB, Llama-3-8B-shaped) moved to another process "
                    f"on this host through {path}, from the offer until its pages are written there "
                    "(`bench_transfer.py`)",
                    f"{_x(one['over_memcpy'])} a numpy memcpy of the same bytes ({one['transfer_ms']:,.0f} ms); aim ≥ 0.5×",
                    # Not shown: the JSON's raw loopback TCP between two threads (`tcp_loopback_over_memcpy`),
                    # which moved 2.5x between two reruns on one machine (39-82 ms): for scale only.
                    f"memcpy {pages['numpy_memcpy_ms']:g} ms"
                    + (f"; offer to the receiver's first decode step {latency:,.0f} ms" if latency is not None else "")))
    return out


def _tiers_rows(r: dict) -> list[Row]:
    out = []
    mt = get(r, "bench_tiers:multiturn")
    if mt:
        out.append((f"multi-turn chat (bundled workload, Gemma 3 12B's KV shape with every layer full), device pool "
                    f"{mt['device_pool_gib']:g} GiB (a quarter of what every conversation needs): token hit rate "
                    "(`bench_tiers.py`)",
                    f"host tier 4× the pool {_pct(mt['host_4x_lru'])} (LRU) / {_pct(mt['host_4x_arc'])} (ARC); host + "
                    f"disk (16×) {_pct(mt['host_4x_disk_16x'])}",
                    f"no tiers {_pct(mt['no_tiers'])}; unlimited device memory {_pct(mt['unlimited'])}"))
    pr = get(r, "bench_tiers:priorities")
    if pr:
        out.append((f"shared system prompts under pressure ({pr['requests']} requests): their hit rate with a high "
                    "retention priority (`Retention`)", _pct(pr["system_prompt_hit_rate_high_priority"]),
                    f"default priority {_pct(pr['system_prompt_hit_rate_default'])}"))
    rs = get(r, "bench_tiers:restart")
    if rs:
        out.append((f"warm restart on the disk tier ({rs['conversations']} conversations): second turns' prompt "
                    "tokens hit", _pct(rs["warm_restart_hit_rate"]), f"a cold start {_pct(rs['cold_start_hit_rate'])}"))
    mv = get(r, "bench_tiers:movement")
    if mv:
        out.append((f"{mv['mib']:g} MiB of blocks moved between tiers, ÷ a numpy memcpy of the same bytes",
                    f"down to host {_x(mv['down_to_host_over_memcpy'])}, up from host "
                    f"{_x(mv['up_from_host_over_memcpy'])} (over a memcpy out of the CPU's caches: "
                    f"{_x(mv.get('down_to_host_over_cold_memcpy'))}, {_x(mv.get('up_from_host_over_cold_memcpy'))}); "
                    f"up from disk {_x(mv['up_from_disk_over_memcpy'])}, down to disk "
                    f"{_x(mv['down_to_disk_over_memcpy'])} (until synced: bound by the disk's fsync, which moved "
                    "by more than 1.3× between reruns); aim ≥ 0.8× for host moves",
                    "dispatching the move down (what the evicting step waits for) runs at "
                    f"{_x(mv.get('down_to_host_critical_path_over_memcpy'))} memcpy speed (to disk "
                    f"{_x(mv.get('down_to_disk_critical_path_over_memcpy'))})"
                    + (f"; up counting the admission that finds the blocks (and reads the disk): from host "
                       f"{_x(mv['up_from_host_with_admission_over_memcpy'])}, from disk "
                       f"{_x(mv['up_from_disk_with_admission_over_memcpy'])}"
                       if "up_from_disk_with_admission_over_memcpy" in mv else "")))
    dm = get(r, "bench_tiers:decode_with_moves")
    if dm:
        out.append((f"decode step ({dm['batch']} × {dm['context']} tokens) while {dm['mib_moved_per_step']:g} MiB of "
                    "blocks move down each step, ÷ the same step without", _x(dm["with_over_without"]),
                    f"{dm['step_with_moves_ms']:.2f} ms vs {dm['step_ms']:.2f} ms"))
    return out


def storage_rows(r: dict) -> list[Row]:
    return _transfer_rows(r) + _tiers_rows(r)


__all__ = ["storage_rows"]
