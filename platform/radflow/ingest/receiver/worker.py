"""One receiver worker process, as the supervisor starts it (radflow/ingest/receiver/workers.py).

``python -m radflow.ingest.receiver.worker --index N --listen-fd FD [--ae-title AET]``: settings
from the RADFLOW_* environment (the supervisor's own), the database schema left as the
supervisor found it (it migrated before starting the workers), and the shared listening socket
inherited as file descriptor ``FD``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from radflow.errors import RadflowError
from radflow.ingest.receiver.service import serve_worker
from radflow.runtime import Runtime
from radflow.settings import Settings

logger = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="radflow-receiver-worker", description=__doc__)
    parser.add_argument("--index", type=int, required=True, help="the worker's number")
    parser.add_argument("--listen-fd", type=int, required=True, help="the shared socket's fd")
    parser.add_argument("--ae-title", default=None, help="default RADFLOW_RECEIVER_AE_TITLE")
    args = parser.parse_args(argv)
    # As `radflow receive` logs: Radflow's messages at INFO, libraries' only when they warn.
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("radflow").setLevel(logging.INFO)
    settings = Settings()
    try:
        with Runtime.open(settings) as rt:
            serve_worker(
                settings,
                args.index,
                args.listen_fd,
                session_factory=rt.session_factory,
                store=rt.store,
                ae_title=args.ae_title,
            )
    except RadflowError as exc:
        # The supervisor restarts this worker; the operator reads why in its log.
        logger.error("receiver worker %d cannot run: %s", args.index, exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
