"""Balancer: policies, outlier ejection, state kept across endpoint updates (pure, seeded rng)."""

from __future__ import annotations

import random

from lictor.agent.proxy.balancer import Balancer, Endpoint

A, B, C = Endpoint("127.0.0.1", 1), Endpoint("127.0.0.1", 2), Endpoint("127.0.0.1", 3)


def test_round_robin_cycles_in_stable_order() -> None:
    b = Balancer("round_robin")
    b.update([C, A, B])
    assert [b.pick(0.0) for _ in range(6)] == [A, B, C, A, B, C]


def test_random_is_seeded_and_covers_all() -> None:
    b = Balancer("random", rng=random.Random(7))
    b.update([A, B, C])
    assert {b.pick(0.0) for _ in range(50)} == {A, B, C}


def test_least_request_prefers_idle() -> None:
    b = Balancer("least_request", rng=random.Random(1))
    b.update([A, B])
    for _ in range(10):
        b.connected(A)
    assert all(b.pick(0.0) == B for _ in range(20))
    for _ in range(10):
        b.released(A)
    b.connected(B)
    assert b.pick(0.0) == A


def test_five_consecutive_failures_eject_for_the_ejection_time() -> None:
    b = Balancer("round_robin", max_failures=5, ejection_time=30.0)
    b.update([A, B])
    assert [b.failed(A, 10.0) for _ in range(5)] == [False] * 4 + [True]
    assert {b.pick(11.0) for _ in range(10)} == {B}
    assert {b.pick(40.1) for _ in range(10)} == {A, B}  # back after 30 s
    assert b.snapshot(11.0)[0]["Ejected"] is True and b.snapshot(11.0)[0]["Ejections"] == 1


def test_success_resets_the_failure_streak() -> None:
    b = Balancer(max_failures=3)
    b.update([A])
    b.failed(A, 0.0)
    b.failed(A, 0.0)
    b.connected(A)
    assert not b.failed(A, 0.0) and not b.failed(A, 0.0)
    assert b.failed(A, 0.0)


def test_all_ejected_still_routes_somewhere() -> None:
    b = Balancer(max_failures=1)
    b.update([A, B])
    b.failed(A, 0.0)
    b.failed(B, 0.0)
    assert b.pick(1.0) in (A, B)


def test_exclude_skips_tried_endpoints_and_runs_out() -> None:
    b = Balancer()
    b.update([A, B])
    assert b.pick(0.0, {A.key}) == B
    assert b.pick(0.0, {A.key, B.key}) is None


def test_update_keeps_state_of_remaining_endpoints() -> None:
    b = Balancer(max_failures=2, ejection_time=5.0)
    b.update([A, B])
    b.failed(A, 0.0)
    b.failed(A, 0.0)
    b.update([A, C])
    assert b.states[A.key].ejected_until == 5.0
    assert B.key not in b.states and b.states[C.key].failures == 0
    assert b.pick(1.0) == C


def test_empty_has_no_pick() -> None:
    assert Balancer().pick(0.0) is None
