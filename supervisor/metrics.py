"""Fleet totals of the counters workers report in their heartbeats.

A worker may add ``key=value`` fields to its heartbeat (``supervisor.channel``); the ones
named in ``SupervisorConfig.counter_fields`` are counters: numbers, or comma-separated lists
of numbers (e.g. one per status class), that only grow during the worker's life. A worker
that exits — retired, recycled, crashed or killed — takes its counters with it, so the policy
adds its last reported values to ``Totals.counters`` (``add``), and a fleet total
(``fleet_counters``) is that plus the live workers' values: it never goes backwards. A worker
killed with SIGKILL loses only what it did since its last heartbeat (about a second).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def numbers(value: str) -> list[float]:
    """``"1,2.5,3"`` → ``[1.0, 2.5, 3.0]``; [] for anything else (a garbled field counts nothing)."""
    try:
        return [float(item) for item in value.split(",")]
    except ValueError:
        return []


def add(into: dict[str, list[float]], fields: Mapping[str, str], names: Iterable[str]) -> None:
    """Add the counter fields ``names`` of ``fields`` to ``into``, item by item."""
    for name in names:
        value = fields.get(name)
        if value is None:
            continue
        total = into.setdefault(name, [])
        for index, number in enumerate(numbers(value)):
            if index < len(total):
                total[index] += number
            else:
                total.append(number)


def fleet_counters(
    retired: Mapping[str, list[float]], live: Iterable[Mapping[str, str]], names: Iterable[str]
) -> dict[str, list[float]]:
    """The totals over the exited workers (``retired``) and the live ones' last fields."""
    names = tuple(names)
    totals = {name: list(values) for name, values in retired.items()}
    for fields in live:
        add(totals, fields, names)
    return totals
