"""The scheduler's own metrics, registered on the service's registry next to the common ones."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.piece_scheduler.peer_registry import PeerRegistry, PeerState
from services.piece_scheduler.task_map import TaskMap, TaskState

# Assignments are answered from memory: sub-millisecond, unless a seed fetch has to be published.
_ASSIGNMENT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


class _TaskStateCollector(Collector):
    """``damselfly_scheduler_tasks{state}``, counted from the piece map at scrape time."""

    def __init__(self, tasks: Callable[[], TaskMap | None]) -> None:
        self._tasks = tasks

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily("damselfly_scheduler_tasks", "Tasks the scheduler knows, by state.", labels=["state"])

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        tasks = self._tasks()
        counts = tasks.state_counts() if tasks is not None else {}
        for state in TaskState:
            family.add_metric([state.value], counts.get(state, 0))
        yield family


class _PeerStateCollector(Collector):
    """``damselfly_scheduler_peers{state}``, counted from the peer table at scrape time."""

    def __init__(self, peers: Callable[[], PeerRegistry | None]) -> None:
        self._peers = peers

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily("damselfly_scheduler_peers", "Peers the scheduler knows, by state.", labels=["state"])

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        registry = self._peers()
        records = registry.all() if registry is not None else []
        for state in PeerState:
            family.add_metric([state.value], sum(1 for record in records if record.state is state))
        yield family


@dataclass(frozen=True)
class SchedulerMetrics:
    """Assignments served, seed fetches requested, back-to-source downloads, skipped parents, tasks."""

    assignments: Counter
    assignment_seconds: Histogram
    seed_fetches: Counter
    back_to_source: Counter
    parents_skipped: Counter

    @classmethod
    def create(
        cls,
        registry: CollectorRegistry,
        tasks: Callable[[], TaskMap | None],
        peers: Callable[[], PeerRegistry | None] = lambda: None,
    ) -> SchedulerMetrics:
        """Register the scheduler's metrics on ``registry``; ``tasks`` and ``peers`` give the live tables."""
        registry.register(_TaskStateCollector(tasks))
        registry.register(_PeerStateCollector(peers))
        return cls(
            assignments=Counter(
                "damselfly_scheduler_assignments",
                "Assignment requests answered, by the task status in the reply.",
                ["status"],
                registry=registry,
            ),
            assignment_seconds=Histogram(
                "damselfly_scheduler_assignment_seconds",
                "Time to answer one assignment request.",
                buckets=_ASSIGNMENT_BUCKETS,
                registry=registry,
            ),
            seed_fetches=Counter(
                "damselfly_scheduler_seed_fetches",
                "Seed fetches requested: 'published' made a job, 'duplicate' found one already queued.",
                ["outcome"],
                registry=registry,
            ),
            back_to_source=Counter(
                "damselfly_scheduler_back_to_source_pieces",
                "Piece downloads from the origin announced by holders (replayed history counts at start).",
                registry=registry,
            ),
            parents_skipped=Counter(
                "damselfly_scheduler_parents_skipped",
                "Candidate parents not in good standing when judged, by reason.",
                ["reason"],
                registry=registry,
            ),
        )
