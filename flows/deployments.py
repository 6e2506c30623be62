"""Deployments: the flows served to a Prefect server by `radflow worker`."""

from __future__ import annotations

from prefect import serve

from flows.ingest import ingest_flow
from flows.process import process_flow
from flows.train import train_flow


def serve_all() -> None:
    """Serve every flow; the Prefect server schedules runs and this process executes them."""
    serve(
        ingest_flow.to_deployment(name="ingest"),
        process_flow.to_deployment(name="process", interval=60),
        # One training per task at a time: a second run waits for the first.
        train_flow.to_deployment(name="train", concurrency_limit=1),
    )
