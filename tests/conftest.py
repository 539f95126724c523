"""Fixtures of the host-transport suite: session-wide rank pools and fresh seeds.

Multi-rank tests take ``pool`` (a :class:`_harness.RankPool` of ``world_size`` persistent
processes, gloo-bootstrapped) and run module-level functions ``fn(ctx, ...)`` on every rank.
Inputs are random per run; the seed is printed (shown on failure) and ``CCL_TEST_SEED=<n>``
pins it.
"""

from __future__ import annotations

import pytest

import _harness


@pytest.fixture(scope="session")
def pools():
    mgr = _harness.PoolManager()
    yield mgr
    mgr.close()


@pytest.fixture(params=[2, 3, 4], ids=lambda w: f"w{w}")
def world_size(request) -> int:
    return request.param


@pytest.fixture
def pool(pools, world_size) -> _harness.RankPool:
    return pools.get(world_size)


@pytest.fixture
def seed() -> int:
    s = _harness.fresh_seed()
    print(f"seed={s}  (rerun with CCL_TEST_SEED={s} to reproduce)")
    return s
