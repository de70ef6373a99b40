"""The evaluator: feature scores, weights, bad-parent rules and ranking."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.piece_scheduler.evaluator import (
    BadParentPolicy,
    Candidate,
    Evaluator,
    Exclusion,
    Requester,
    Verdict,
    Weights,
    cost_score,
    free_upload_score,
    is_slow,
    location_score,
)
from services.piece_scheduler.peer_registry import PeerState
from shared.schemas import PeerInfo

NOW = 1_000_000.0
POLICY = BadParentPolicy()
EVALUATOR = Evaluator()
ME = Requester(peer_id="me", idc="idc-1", location="cn|hz|z1")


def info(peer_id: str, **values: object) -> PeerInfo:
    fields: dict[str, object] = {
        "peer_id": peer_id,
        "node_name": peer_id,
        "ip": "10.0.0.1",
        "upload_url": f"http://{peer_id}:40901",
        "upload_slots": 10,
    }
    fields.update(values)
    return PeerInfo.model_validate(fields)


def candidate(peer_id: str, *, state: PeerState = PeerState.ACTIVE, **values: object) -> Candidate:
    info_values = {key: values.pop(key) for key in ("idc", "location", "is_seed", "upload_slots") if key in values}
    return Candidate(peer_id=peer_id, state=state, info=info(peer_id, **info_values), **values)  # type: ignore[arg-type]


def rank(candidates: list[Candidate], piece_total: int = 10, limit: int = 4) -> list[str]:
    verdicts = [EVALUATOR.judge(c, ME, piece_total, NOW) for c in candidates]
    return [verdict.peer_id for verdict in EVALUATOR.rank(verdicts, limit)]


# --- weights and features ----------------------------------------------------------------------------


def test_default_weights_sum_to_one_and_bad_weights_are_refused() -> None:
    weights = Weights()
    assert sum(dataclasses.astuple(weights)) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        Weights(host_type=0.5)
    with pytest.raises(ValueError):
        Weights(free_upload=-0.1, host_type=0.6)


def test_free_upload_is_the_share_of_free_slots() -> None:
    assert free_upload_score(candidate("a", upload_slots_in_use=0)) == 1.0
    assert free_upload_score(candidate("a", upload_slots_in_use=4)) == pytest.approx(0.6)
    assert free_upload_score(candidate("a", upload_slots_in_use=15)) == 0.0


def test_cost_score_prefers_cheaper_parents_and_is_neutral_without_samples() -> None:
    assert cost_score([], 500.0) == 0.5
    assert cost_score([500.0], 500.0) == 0.5
    assert cost_score([10.0, 20.0], 500.0) > cost_score([100.0], 500.0) > cost_score([5000.0], 500.0)


@pytest.mark.parametrize(
    ("mine", "theirs", "expected"),
    [
        ("cn|hz|z1", "cn|hz|z1", 1.0),
        ("cn|hz|z1", "CN|HZ|Z1", 1.0),
        ("cn|hz|z1", "cn|hz|z2", 0.4),
        ("cn|hz|z1", "cn|sh|z1", 0.2),
        ("cn|hz|z1", "us|hz|z1", 0.0),
        ("cn|hz", "cn|hz|z1", 0.4),
        ("", "cn", 0.0),
        ("a|b|c|d|e|f", "a|b|c|d|e|g", 1.0),  # Only five elements count.
    ],
)
def test_location_affinity_counts_common_leading_elements(mine: str, theirs: str, expected: float) -> None:
    requester = Requester(peer_id="me", location=mine)
    assert location_score(requester, candidate("a", location=theirs)) == pytest.approx(expected)


def test_each_feature_moves_the_ranking() -> None:
    assert rank([candidate("busy", upload_slots_in_use=8), candidate("idle")]) == ["idle", "busy"]
    assert rank([candidate("far", idc="idc-2"), candidate("near", idc="idc-1")]) == ["near", "far"]
    assert rank([candidate("x", location="cn|sh"), candidate("y", location="cn|hz|z2")]) == ["y", "x"]
    assert rank([candidate("few", pieces_held=1), candidate("many", pieces_held=9)]) == ["many", "few"]
    assert rank([candidate("slow", costs=(400.0, 410.0)), candidate("fast", costs=(20.0, 21.0))]) == ["fast", "slow"]


def test_a_normal_peer_is_preferred_to_a_seed_that_holds_everything() -> None:
    seed = candidate("seed", is_seed=True, pieces_held=10)
    peer = candidate("peer", pieces_held=1)
    assert rank([seed, peer]) == ["peer", "seed"]


def test_ties_are_broken_by_peer_id() -> None:
    assert rank([candidate("b"), candidate("a"), candidate("c")]) == ["a", "b", "c"]


@settings(max_examples=200, deadline=None)
@given(
    slots=st.integers(1, 100),
    in_use=st.integers(0, 120),
    held=st.integers(0, 50),
    total=st.integers(0, 50),
    costs=st.lists(st.floats(0.1, 1e6), max_size=20),
    is_seed=st.booleans(),
    idc=st.sampled_from(["", "idc-1", "idc-2"]),
    location=st.sampled_from(["", "cn", "cn|hz", "cn|hz|z1", "us|ny"]),
)
def test_scores_stay_within_zero_and_one(
    slots: int,
    in_use: int,
    held: int,
    total: int,
    costs: list[float],
    is_seed: bool,
    idc: str,
    location: str,
) -> None:
    parent = candidate(
        "p",
        upload_slots=slots,
        upload_slots_in_use=in_use,
        pieces_held=held,
        costs=tuple(costs),
        is_seed=is_seed,
        idc=idc,
        location=location,
    )
    assert 0.0 <= EVALUATOR.score(parent, ME, total) <= 1.0


@settings(max_examples=200, deadline=None)
@given(held=st.integers(0, 10), in_use=st.integers(0, 9), costs=st.lists(st.floats(1, 1000), max_size=5))
def test_a_normal_peer_outranks_an_otherwise_equal_seed_whatever_it_holds(
    held: int, in_use: int, costs: list[float]
) -> None:
    common: dict[str, Any] = {"upload_slots_in_use": in_use, "costs": tuple(costs)}
    seed = candidate("seed", is_seed=True, pieces_held=10, **common)
    peer = candidate("peer", pieces_held=held, **common)
    assert EVALUATOR.score(peer, ME, 10) > EVALUATOR.score(seed, ME, 10)


# --- bad parents -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("costs", "slow"),
    [
        ((), False),
        ((10.0,), False),  # One sample says nothing.
        ((10.0, 150.0), False),  # 15x: not yet.
        ((10.0, 250.0), True),  # Over 20x the mean of the ones before.
        ((10.0, 12.0, 11.0, 300.0), True),
        ((10.0, 12.0, 11.0, 200.0), False),
        ((10.0, 10.0, 10.0, 10.0, 11.0), False),  # Three sigma of nothing, but not twice the mean.
        ((10.0, 12.0, 11.0, 9.0, 10.0, 30.0), True),  # Five samples on: three sigma (and over 2x).
        ((10.0, 30.0, 5.0, 40.0, 20.0, 55.0), False),  # Noisy history: 55 is within three sigma.
        ((10.0, 12.0, 11.0, 9.0, 10.0, 30.0, 10.0), False),  # Only the last sample is judged.
    ],
)
def test_slow_parent_rule(costs: tuple[float, ...], slow: bool) -> None:
    assert is_slow(costs, POLICY) is slow


def test_hard_exclusions_are_never_offered() -> None:
    cases = {
        Exclusion.SELF: candidate("me"),
        Exclusion.NOT_ACTIVE: candidate("stale", state=PeerState.STALE),
        Exclusion.NO_INFO: Candidate(peer_id="ghost", state=PeerState.ACTIVE, info=None),
        Exclusion.NO_UPLOAD: candidate("closed", upload_slots=0),
        Exclusion.BLOCKED: candidate("liar", blocked=True),
    }
    for reason, parent in cases.items():
        verdict = EVALUATOR.judge(parent, ME, 10, NOW)
        assert verdict.exclusion is reason and reason.is_hard
        assert EVALUATOR.rank([verdict], 4) == []
    assert EVALUATOR.judge(candidate("left", state=PeerState.LEFT), ME, 10, NOW).exclusion is Exclusion.NOT_ACTIVE
    assert EVALUATOR.judge(candidate("new", state=PeerState.PENDING), ME, 10, NOW).exclusion is Exclusion.NOT_ACTIVE


def test_soft_exclusions_are_skipped_while_a_good_parent_exists() -> None:
    good = candidate("good", idc="idc-2", location="us")
    cooling = candidate("cooling", idc="idc-1", last_failure_at=NOW - 5)
    slow = candidate("slow", idc="idc-1", costs=(10.0, 11.0, 9.0, 10.0, 10.0, 400.0), last_cost_at=NOW - 1)
    busy = candidate("busy", idc="idc-1", upload_slots_in_use=10)
    for parent, reason in ((cooling, Exclusion.COOLDOWN), (slow, Exclusion.SLOW), (busy, Exclusion.BUSY)):
        assert EVALUATOR.judge(parent, ME, 10, NOW).exclusion is reason and not reason.is_hard
    assert rank([good, cooling, slow, busy]) == ["good"]
    # With nobody in good standing they are a last resort, best score first; hard exclusions never.
    # (The slow one's mean cost is still low: only its last download was an outlier.)
    assert rank([cooling, slow, busy, candidate("me")]) == ["slow", "cooling", "busy"]


def test_cooldown_and_slow_verdicts_expire() -> None:
    cooled = candidate("a", last_failure_at=NOW - POLICY.cooldown_seconds - 1)
    assert EVALUATOR.judge(cooled, ME, 10, NOW).exclusion is None
    forgiven = candidate("b", costs=(10.0, 400.0), last_cost_at=NOW - POLICY.slow_memory_seconds - 1)
    assert EVALUATOR.judge(forgiven, ME, 10, NOW).exclusion is None


def test_rank_respects_the_limit() -> None:
    parents = [candidate(f"p{i}") for i in range(10)]
    assert rank(parents, limit=4) == ["p0", "p1", "p2", "p3"]
    assert rank(parents, limit=0) == []


@settings(max_examples=200, deadline=None)
@given(
    peers=st.lists(
        st.tuples(
            st.sampled_from(["me", "a", "b", "c", "d", "e"]),
            st.sampled_from(PeerState),
            st.booleans(),
            st.integers(0, 12),
            st.one_of(st.none(), st.floats(NOW - 100, NOW)),
        ),
        max_size=8,
        unique_by=lambda peer: peer[0],
    ),
    limit=st.integers(0, 5),
)
def test_ranking_invariants(peers: list[tuple[str, PeerState, bool, int, float | None]], limit: int) -> None:
    candidates = [
        candidate(peer_id, state=state, blocked=blocked, upload_slots_in_use=in_use, last_failure_at=failure)
        for peer_id, state, blocked, in_use, failure in peers
    ]
    verdicts = [EVALUATOR.judge(c, ME, 10, NOW) for c in candidates]
    ranked = EVALUATOR.rank(verdicts, limit)
    assert len(ranked) <= limit
    ids = [verdict.peer_id for verdict in ranked]
    assert "me" not in ids and len(set(ids)) == len(ids)
    for verdict in ranked:
        assert verdict.candidate.state is PeerState.ACTIVE and not verdict.candidate.blocked
    scores = [verdict.score for verdict in ranked]
    assert scores == sorted(scores, reverse=True)
    good = [v for v in verdicts if v.exclusion is None]
    if good and limit:
        assert all(v.exclusion is None for v in ranked)


def test_verdict_peer_id() -> None:
    assert Verdict(candidate("a"), 0.5).peer_id == "a"
