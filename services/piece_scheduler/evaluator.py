"""The evaluator: scores candidate parents of one task for one requester, and skips the bad ones.

After Dragonfly's ``scheduler/scheduling/evaluator/evaluator_base.go``. A score is a weighted sum of
features, each in ``[0, 1]``, with weights that sum to 1, so a score is in ``[0, 1]`` too:

================  ======  =======================================================================
feature           weight  value
================  ======  =======================================================================
host type          0.30   1 for a normal peer, 0 for a seed: offload the seed whenever a peer can
free upload        0.20   free slots / slots (the parent's last heartbeat against its PeerInfo)
recent cost        0.15   R / (R + mean cost), R = 500 ms; 0.5 (as if the mean were R) when unknown
IDC                0.15   1 when requester and parent name the same (non-empty) IDC, else 0
location           0.10   common leading elements of the '|'-separated paths / 5 (1 when equal)
pieces held        0.10   pieces of the task it holds / pieces of the task
================  ======  =======================================================================

The host type weight is the largest on purpose. A seed has a built-in lead: it holds every piece
(+0.10) and, since everyone's first pieces come from it, it has measured costs while a new peer has
none (up to +0.075). 0.30 outweighs both, so a normal peer beats an otherwise comparable seed; only
locality (IDC and location together, 0.25) on top of that lead lets a nearby seed beat a far peer.

Candidates are then judged. *Hard* exclusions are never offered: the requester itself, a peer that is
not ACTIVE or never sent its info, one with no upload slots, one that served a bad piece of this task.
*Soft* exclusions are skipped while any candidate in good standing holds the piece, and offered only as
a last resort (a slow peer is still cheaper than the origin): a parent in cooldown after a connection,
timeout or HTTP failure, one whose last download cost is an outlier (the rule below), one whose upload
slots are all in use.

A parent is slow (Dragonfly's ``IsBadNode``) when, of its recent costs, the last one is far above the
mean of the ones before it: more than 20x with fewer than 5 samples, else more than 3 standard
deviations above (and at least twice) the mean. Two samples are needed for any verdict, and a verdict
is forgotten after a while so a benched parent gets another chance.
"""

from __future__ import annotations

import enum
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from services.piece_scheduler.peer_registry import PeerState
from shared.schemas import PeerInfo

# Dragonfly compares at most five location elements ('country|province|city|zone|rack').
MAX_LOCATION_ELEMENTS = 5
LOCATION_SEPARATOR = "|"


class Exclusion(enum.Enum):
    """Why a candidate is not (or only as a last resort) offered as a parent."""

    SELF = "self"
    NO_INFO = "no_info"
    NOT_ACTIVE = "not_active"
    NO_UPLOAD = "no_upload"
    BLOCKED = "blocked"
    COOLDOWN = "cooldown"
    SLOW = "slow"
    BUSY = "busy"

    @property
    def is_hard(self) -> bool:
        """Whether a candidate excluded for this reason is never offered."""
        return self in _HARD


_HARD = frozenset({Exclusion.SELF, Exclusion.NO_INFO, Exclusion.NOT_ACTIVE, Exclusion.NO_UPLOAD, Exclusion.BLOCKED})


@dataclass(frozen=True)
class Weights:
    """The weight of each feature in a score; they must sum to 1 (see the module docstring)."""

    host_type: float = 0.30
    free_upload: float = 0.20
    cost: float = 0.15
    idc: float = 0.15
    location: float = 0.10
    pieces_held: float = 0.10

    def __post_init__(self) -> None:
        values = (self.host_type, self.free_upload, self.cost, self.idc, self.location, self.pieces_held)
        if any(value < 0 for value in values) or not math.isclose(sum(values), 1.0, abs_tol=1e-9):
            raise ValueError(f"weights must be non-negative and sum to 1, got {values}")


@dataclass(frozen=True)
class BadParentPolicy:
    """Thresholds of the bad-parent rules."""

    min_samples: int = 2  # Fewer costs than this say nothing.
    normal_samples: int = 5  # From this many on, the three-sigma rule applies instead of the 20x one.
    sigmas: float = 3.0
    outlier_factor: float = 20.0
    # With steady costs the standard deviation is ~0 and any jitter would exceed mean + 3 sigma.
    min_slowdown: float = 2.0
    cooldown_seconds: float = 30.0  # Benched this long after a connection/timeout/HTTP failure.
    slow_memory_seconds: float = 300.0  # A slow verdict from an older last sample is forgotten.


@dataclass(frozen=True)
class Candidate:
    """One peer that holds pieces of the task, with everything the evaluator looks at."""

    peer_id: str
    state: PeerState
    info: PeerInfo | None
    upload_slots_in_use: int = 0
    pieces_held: int = 0
    costs: tuple[float, ...] = ()  # Recent download costs from this peer, oldest first (ms).
    last_cost_at: float | None = None  # Wall-clock seconds of the last cost sample.
    last_failure_at: float | None = None  # Wall-clock seconds of its last connection-type failure.
    blocked: bool = False  # It served a bad piece of this task.


@dataclass(frozen=True)
class Requester:
    """The peer asking for parents, as far as its locality goes."""

    peer_id: str
    idc: str = ""
    location: str = ""


@dataclass(frozen=True)
class Verdict:
    """A candidate's score and, when it is not in good standing, why."""

    candidate: Candidate
    score: float
    exclusion: Exclusion | None = None

    @property
    def peer_id(self) -> str:
        """The candidate's peer id."""
        return self.candidate.peer_id


def is_slow(costs: Sequence[float], policy: BadParentPolicy) -> bool:
    """Whether the last cost is an outlier against the ones before it (Dragonfly's rule, guarded)."""
    if len(costs) < policy.min_samples:
        return False
    *history, last = costs
    mean = statistics.fmean(history)
    if len(costs) < policy.normal_samples:
        return last > mean * policy.outlier_factor
    stdev = statistics.pstdev(history, mu=mean)
    return last > mean + policy.sigmas * stdev and last > mean * policy.min_slowdown


def free_upload_score(candidate: Candidate) -> float:
    """Free upload slots over all slots, in [0, 1]."""
    slots = candidate.info.upload_slots if candidate.info else 0
    if slots <= 0:
        return 0.0
    return max(0.0, min(1.0, (slots - candidate.upload_slots_in_use) / slots))


def host_type_score(candidate: Candidate) -> float:
    """1 for a normal peer, 0 for a seed."""
    return 0.0 if candidate.info is not None and candidate.info.is_seed else 1.0


def cost_score(costs: Sequence[float], reference_ms: float) -> float:
    """``R / (R + mean)``: 1 for instant downloads, 0.5 at the reference cost or with no samples."""
    mean = statistics.fmean(costs) if costs else reference_ms
    return reference_ms / (reference_ms + mean)


def idc_score(requester: Requester, candidate: Candidate) -> float:
    """1 when both name the same IDC."""
    idc = candidate.info.idc if candidate.info else ""
    return 1.0 if requester.idc and idc and requester.idc.casefold() == idc.casefold() else 0.0


def location_score(requester: Requester, candidate: Candidate) -> float:
    """The share of leading location elements both have in common (Dragonfly's affinity score)."""
    location = candidate.info.location if candidate.info else ""
    if not requester.location or not location:
        return 0.0
    if requester.location.casefold() == location.casefold():
        return 1.0
    mine = requester.location.casefold().split(LOCATION_SEPARATOR)
    theirs = location.casefold().split(LOCATION_SEPARATOR)
    common = 0
    for left, right in zip(mine[:MAX_LOCATION_ELEMENTS], theirs[:MAX_LOCATION_ELEMENTS], strict=False):
        if left != right:
            break
        common += 1
    return common / MAX_LOCATION_ELEMENTS


def pieces_held_score(candidate: Candidate, piece_total: int) -> float:
    """The share of the task's pieces the candidate holds."""
    if piece_total <= 0:
        return 0.0
    return max(0.0, min(1.0, candidate.pieces_held / piece_total))


class Evaluator:
    """Scores and judges candidate parents; pure, so the same inputs always rank the same way."""

    def __init__(
        self,
        weights: Weights | None = None,
        policy: BadParentPolicy | None = None,
        cost_reference_ms: float = 500.0,
    ) -> None:
        self.weights = weights or Weights()
        self.policy = policy or BadParentPolicy()
        self.cost_reference_ms = cost_reference_ms

    def score(self, candidate: Candidate, requester: Requester, piece_total: int) -> float:
        """The weighted score in [0, 1]; ``piece_total`` is the task's piece count (or best guess)."""
        weights = self.weights
        return (
            weights.free_upload * free_upload_score(candidate)
            + weights.host_type * host_type_score(candidate)
            + weights.cost * cost_score(candidate.costs, self.cost_reference_ms)
            + weights.idc * idc_score(requester, candidate)
            + weights.location * location_score(requester, candidate)
            + weights.pieces_held * pieces_held_score(candidate, piece_total)
        )

    def exclusion(self, candidate: Candidate, requester: Requester, now: float) -> Exclusion | None:
        """Why ``candidate`` is not in good standing at wall-clock ``now``, or None when it is."""
        policy = self.policy
        info = candidate.info
        if candidate.peer_id == requester.peer_id:
            return Exclusion.SELF
        if info is None:
            return Exclusion.NO_INFO
        if candidate.state is not PeerState.ACTIVE:
            return Exclusion.NOT_ACTIVE
        if info.upload_slots <= 0:
            return Exclusion.NO_UPLOAD
        if candidate.blocked:
            return Exclusion.BLOCKED
        if candidate.last_failure_at is not None and now - candidate.last_failure_at < policy.cooldown_seconds:
            return Exclusion.COOLDOWN
        recent = candidate.last_cost_at is not None and now - candidate.last_cost_at <= policy.slow_memory_seconds
        if recent and is_slow(candidate.costs, policy):
            return Exclusion.SLOW
        if candidate.upload_slots_in_use >= info.upload_slots:
            return Exclusion.BUSY
        return None

    def judge(self, candidate: Candidate, requester: Requester, piece_total: int, now: float) -> Verdict:
        """The candidate's score and standing."""
        return Verdict(
            candidate=candidate,
            score=self.score(candidate, requester, piece_total),
            exclusion=self.exclusion(candidate, requester, now),
        )

    @staticmethod
    def rank(verdicts: Iterable[Verdict], limit: int) -> list[Verdict]:
        """Up to ``limit`` parents, best first: those in good standing, else the soft-excluded ones."""
        verdicts = list(verdicts)
        good = [verdict for verdict in verdicts if verdict.exclusion is None]
        if not good:
            good = [verdict for verdict in verdicts if verdict.exclusion is not None and not verdict.exclusion.is_hard]
        # Ties are broken by peer id so replicas (and tests) agree on the order.
        good.sort(key=lambda verdict: (-verdict.score, verdict.peer_id))
        return good[: max(limit, 0)]
