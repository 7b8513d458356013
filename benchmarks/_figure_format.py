"""What every figure row of the README's table is written with: the results lookup and
the number formats (`figure_rows.py` and `figure_rows_storage.py`)."""

from __future__ import annotations

Row = tuple[str, str, str]


def get(results: dict, path: str):
    """``results['bench']['result'][...]`` along a dotted path, or None."""
    bench, _, rest = path.partition(":")
    node = results.get(bench, {}).get("result")
    for key in filter(None, rest.split(".")):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _x(v) -> str:
    return f"**{v:.2f}×**" if isinstance(v, (int, float)) else "—"


def _pct(v, digits: int = 1) -> str:
    return f"{100 * v:.{digits}f} %" if isinstance(v, (int, float)) else "—"


__all__ = ["Row", "_pct", "_x", "get"]
