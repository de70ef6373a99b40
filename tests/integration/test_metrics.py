"""What an operator graphs moves with real traffic: one blob pulled through two peers of a real cluster.

Every service is its own process, as deployed; the test reads each one's ``/metrics`` over HTTP.
"""

from __future__ import annotations

import os
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.tasks import task_id_for_digest
from tests.integration.test_tracing import push_blob
from tests.support.cluster import local_cluster
from tests.support.registry import RegistryServer
from tests.support.waiting import eventually

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MIB = 1024 * 1024
Samples = list[tuple[str, dict[str, str], float]]


async def scrape(session: aiohttp.ClientSession, base_url: str) -> Samples:
    async with session.get(f"{base_url}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` that carry ``labels``; fails when there is none."""
    matching = [v for n, have, v in samples if n == name and labels.items() <= have.items()]
    assert matching, f"no sample {name}{labels}"
    return sum(matching)


async def fetch(session: aiohttp.ClientSession, url: str) -> bytes:
    async with session.get(url) as response:
        assert response.status == 200, await response.text()
        return await response.read()


async def test_a_pull_through_two_peers_moves_bytes_by_source_back_to_source_and_assignments(
    tmp_path: Path, registry: RegistryServer
) -> None:
    data = os.urandom(3 * MIB)  # Three pieces (of 1 MiB: see shared.tasks.piece_size_for).
    size = len(data)
    digest = push_blob(registry, "test/metered", data)
    task_id = task_id_for_digest(digest)
    async with (
        local_cluster(tmp_path / "cluster", registry.url, peers=2) as plan,
        aiohttp.ClientSession() as session,
    ):
        first, second = plan.peers
        blob = f"/v2/test/metered/blobs/{digest}"

        # peer-0's pull sends the blob back to source: the seed fetches it, peer-0 gets it from the seed.
        assert await fetch(session, first.proxy + blob) == data

        async def completed_on_first() -> bool:
            async with session.get(f"{first.upload}/api/v1/tasks/{task_id}") as response:
                return response.status == 200 and (await response.json())["completed"] is True

        await eventually(completed_on_first, what="peer-0 to hold the whole blob")
        # Again through peer-0: from its own store. Then peer-1: over P2P, the origin is not asked again.
        assert await fetch(session, first.proxy + blob) == data
        mark = registry.mark()
        assert await fetch(session, second.proxy + blob) == data
        assert registry.blob_bytes_served(digest, since=mark) == 0

        served = "damselfly_proxy_served_bytes_total"
        proxy_0, proxy_1 = await scrape(session, first.proxy), await scrape(session, second.proxy)
        assert value(proxy_0, served, source="origin") == size
        assert value(proxy_0, served, source="local") == size
        assert value(proxy_0, served, source="peer") == 0
        assert value(proxy_1, served, source="peer") == size
        assert value(proxy_1, served, source="origin") == value(proxy_1, served, source="local") == 0
        # Traffic saved, as the dashboard computes it: two of the three pulls did not need the origin.
        total = value(proxy_0 + proxy_1, served)
        assert (total - value(proxy_0 + proxy_1, served, source="origin")) / total == pytest.approx(2 / 3)
        assert value(proxy_0, "damselfly_proxy_piece_download_seconds_count", parent="seed") == 3
        assert value(proxy_1, "damselfly_proxy_piece_download_seconds_count") == 3
        assert not [sample for sample in proxy_0 + proxy_1 if sample[0] == "damselfly_proxy_piece_failures_total"]

        seed = await scrape(session, plan.seed_fetcher_url)
        assert value(seed, "damselfly_seed_back_to_source_total", outcome="completed") == 1
        assert value(seed, "damselfly_seed_back_to_source_total", outcome="failed") == 0
        assert value(seed, "damselfly_seed_origin_bytes_total") == size
        assert value(seed, "damselfly_seed_origin_range_seconds_count") == 3

        scheduler = await scrape(session, plan.scheduler_url)
        assert value(scheduler, "damselfly_scheduler_seed_fetches_total", outcome="published") == 1
        assignments = value(scheduler, "damselfly_scheduler_assignments_total")
        assert assignments >= 2  # At least one per peer.
        assert value(scheduler, "damselfly_scheduler_assignments_total", status="available") >= 1  # peer-1's.
        assert value(scheduler, "damselfly_scheduler_assignment_seconds_count") == assignments

        async def scheduler_counted_the_origin_pieces() -> bool:
            samples = await scrape(session, plan.scheduler_url)
            return value(samples, "damselfly_scheduler_back_to_source_pieces_total") == 3

        await eventually(scheduler_counted_the_origin_pieces, what="the scheduler to count 3 origin pieces")

        # The cache-stores uploaded what the peers downloaded: six pieces, twice the blob.
        stores = (plan.seed_upload_url, first.upload, second.upload)

        async def uploads_add_up() -> bool:
            samples = [sample for url in stores for sample in await scrape(session, url)]
            return (
                value(samples, "damselfly_upload_bytes_total") == 2 * size
                and value(samples, "damselfly_upload_pieces_served_total") == 6
                and value(samples, "damselfly_upload_slots_in_use") == 0
            )

        await eventually(uploads_add_up, what="the uploads to add up")

        # Each peer's store holds the blob; the gauge follows at the janitor's next refresh.
        async def disk_usage_counted() -> bool:
            usages = [
                value(await scrape(session, peer.upload), "damselfly_cache_disk_usage_bytes") for peer in plan.peers
            ]
            return usages == [size, size]

        await eventually(disk_usage_counted, what="the cache-stores' disk usage gauges")
