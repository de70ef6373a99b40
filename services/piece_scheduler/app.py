"""Composition root of the piece-scheduler."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.piece_scheduler import api
from services.piece_scheduler.assignment import AssignmentService
from services.piece_scheduler.config import SchedulerConfig
from services.piece_scheduler.evaluator import BadParentPolicy, Evaluator
from services.piece_scheduler.handlers import (
    PEER_EVENTS_CONSUMER,
    TASK_EVENTS_CONSUMER,
    PeerEventHandler,
    TaskEventHandler,
    sweep_peers,
)
from services.piece_scheduler.jobs import JobService, settle_jobs
from services.piece_scheduler.metrics import SchedulerMetrics
from services.piece_scheduler.peer_registry import PeerRegistry
from services.piece_scheduler.replay import StreamReplay
from services.piece_scheduler.task_map import TaskMap
from shared.db import create_db_engine, create_tables, database_ready
from shared.service import background_tasks, create_service_app, service_runtime
from shared.subjects import ALL_STREAMS


def create_app(config: SchedulerConfig) -> FastAPI:
    """The scheduler's app: peer table and piece map fed from NATS, assignments, admin routes."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_db_engine(config.effective_database_url)
        try:
            await asyncio.to_thread(create_tables, engine)
            async with service_runtime(app, config, streams=ALL_STREAMS) as runtime:
                runtime.add_readiness_check("database", lambda: database_ready(engine))
                bus = runtime.bus
                registry = PeerRegistry(config.peer_stale_after_seconds, config.peer_evict_after_seconds)
                tasks = TaskMap()
                app.state.peers = registry
                app.state.tasks = tasks

                # Both tables are folds over their streams, replayed from the start by ephemeral consumers;
                # the replays' targets are taken first so assignments can wait for them.
                peers_replay = StreamReplay(PEER_EVENTS_CONSUMER.stream)
                tasks_replay = StreamReplay(TASK_EVENTS_CONSUMER.stream)
                await peers_replay.snapshot(bus)
                await tasks_replay.snapshot(bus)
                handler = PeerEventHandler(registry, engine)
                bus.consume(PEER_EVENTS_CONSUMER, peers_replay.wrap(handler), name="scheduler-peers")
                bus.consume(
                    TASK_EVENTS_CONSUMER,
                    tasks_replay.wrap(TaskEventHandler(tasks, metrics)),
                    name="scheduler-tasks",
                )

                async def replayed() -> bool:
                    return peers_replay.done and tasks_replay.done

                runtime.add_readiness_check("replayed", replayed)

                evaluator = Evaluator(
                    policy=BadParentPolicy(
                        cooldown_seconds=config.parent_cooldown_seconds,
                        slow_memory_seconds=config.slow_parent_memory_seconds,
                    )
                )
                assignments = AssignmentService(
                    tasks=tasks,
                    peers=registry,
                    bus=bus,
                    config=config,
                    evaluator=evaluator,
                    metrics=metrics,
                    replays=(peers_replay, tasks_replay),
                )
                await assignments.serve()
                jobs = JobService(
                    engine=engine,
                    tasks=tasks,
                    assignments=assignments,
                    bus=bus,
                    resolve_timeout=config.api.preheat_resolve_timeout_seconds,
                )
                app.state.jobs = jobs
                await jobs.resume()

                async with background_tasks(
                    settle_jobs(jobs, config.sweep_interval_seconds),
                    sweep_peers(handler, config.sweep_interval_seconds),
                    # Bounds the replay wait for readiness too, not only for the first assignment.
                    peers_replay.wait(config.replay_wait_seconds),
                    tasks_replay.wait(config.replay_wait_seconds),
                ):
                    try:
                        yield
                    finally:
                        await jobs.close()
        finally:
            engine.dispose()

    app = create_service_app(
        config,
        lifespan,
        title="Damselfly piece-scheduler",
        description="Which peer holds which piece, and who fetches from whom.",
    )
    metrics = SchedulerMetrics.create(
        app.state.metrics.registry,
        lambda: getattr(app.state, "tasks", None),
        lambda: getattr(app.state, "peers", None),
    )
    app.state.scheduler_metrics = metrics
    app.state.admin_api = config.api
    app.include_router(api.router)
    return app
