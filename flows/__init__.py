"""Prefect flows: thin orchestration over radflow functions.

Retries, caching, triggers and concurrency limits live here; the logic lives in radflow.
"""
