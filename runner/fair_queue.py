"""The order waiting submissions start in: round-robin across teams, oldest first within one.

The rules, which both sources follow (the ledger in SQL, a RAMP board through
``fair_order``):

- a submission claimed before (re-run by the organiser, or whose run the machine lost)
  goes first;
- otherwise the team whose last turn is the oldest takes the next turn (a team never served
  first), with its oldest waiting submission; between teams never served, the one whose
  submission arrived first;
- a team with ``max_running_per_team`` runs going keeps its turn and waits.

So while a team waits, every other team starts at most one run: one that starts has the
newest turn, behind the waiting team's older one.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# A ledger name ``team/submission``: the submission folder sits in a team folder.
TEAM_SEPARATOR = "/"


def team_of(name: str) -> str:
    """The team of a ledger name: ``team`` for ``team/submission``; a name with no team is
    its own team."""
    team, separator, _ = name.partition(TEAM_SEPARATOR)
    return team if separator else name


@dataclass(frozen=True)
class Waiting:
    """A submission waiting to start, as ``fair_order`` reads it."""

    key: Hashable
    team: Hashable
    # Claimed before: a re-run, or a run lost through no fault of the submission.
    again: bool = False


def fair_order(waiting: Iterable[Waiting], last_turns: Mapping[Hashable, Any] | None = None,
               running: Mapping[Hashable, int] | None = None, cap: int | None = None,
               limit: int | None = None) -> list[Waiting]:
    """The order ``waiting`` (oldest first) start in, under the module's rules.

    ``last_turns`` maps a team to when it was last served (any values that compare with
    each other; a team absent was never served); ``running`` counts each team's runs going,
    which with ``cap`` (``max_running_per_team``) leaves a team out once it has ``cap``.
    At most ``limit`` are returned. Costs O(n + k log t) for k returned of t teams.
    """
    last_turns, running = last_turns or {}, running or {}
    queues: dict[Hashable, deque[tuple[int, Waiting]]] = {}
    for index, item in enumerate(waiting):
        queues.setdefault(item.team, deque()).append((index, item))
    for team, items in queues.items():
        if any(item.again for _, item in items):  # claimed before: first within the team too
            queues[team] = deque(sorted(items, key=lambda pair: not pair[1].again))

    def turn(team: Hashable) -> tuple:
        return (1, last_turns[team]) if team in last_turns else (0, 0)

    def entry(team: Hashable, turn_key: tuple) -> tuple:
        index, head = queues[team][0]
        return (not head.again, turn_key, index, team)

    started = dict(running)
    heap = [entry(team, turn(team)) for team in queues
            if cap is None or started.get(team, 0) < cap]
    heapq.heapify(heap)
    order: list[Waiting] = []
    served = 0
    while heap and (limit is None or len(order) < limit):
        *_, team = heapq.heappop(heap)
        order.append(queues[team].popleft()[1])
        served += 1
        started[team] = started.get(team, 0) + 1
        if queues[team] and (cap is None or started[team] < cap):
            heapq.heappush(heap, entry(team, (2, served)))
    return order
