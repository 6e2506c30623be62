"""Run in a fresh process by test_guard.py: status, then one instance received, as a pynetdicom
or pydicom other than the guard's would see it.

``python receive_once.py SCENARIO STORESCU FILE...`` with the RADFLOW_* environment of a migrated
database. Prints ``radflow status --json``, then one JSON line: the receiver's counters once the
files are sent and indexed, what is left in ``spool/incoming`` after it stopped, and which of the
receiver's fast-path modules got loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pydicom
import pynetdicom

# The private modules and names of pynetdicom the fast path uses, and any other loaded.
PRIVATE_MODULES = ["pynetdicom._handlers", "pynetdicom._config", "pynetdicom._globals"]
FAST_PATH_MODULES = ["radflow.ingest.receiver.transport", "radflow.ingest.receiver.dimse"]


def rename_private_names() -> None:
    """pynetdicom as a release that renamed its private modules looks to Radflow: its public
    API imported and working, no private module that 3.0.4 has importable.

    The names stay bound where pynetdicom's own modules look them up (its functions import
    ``_config`` lazily): a release that renamed them would have renamed its own uses too.
    """
    loaded = [name for name in sys.modules if name.startswith("pynetdicom._")]
    for name in {*PRIVATE_MODULES, *loaded}:
        sys.modules[name] = None  # type: ignore[assignment]  # importing it raises ImportError


SCENARIOS = {
    "private-names-missing": rename_private_names,
    "another-pynetdicom": lambda: setattr(pynetdicom, "__version__", "99.0.0"),
    "another-pydicom": lambda: setattr(pydicom, "__version__", "99.0.0"),
    "fast-path-off": lambda: None,  # RADFLOW_RECEIVER_FAST_PATH=false in the environment
}


def main(scenario: str, storescu: str, *files: str) -> None:
    SCENARIOS[scenario]()

    import radflow.ingest.receiver
    import radflow.services.status  # what `radflow status` imports
    from cli.main import main as radflow_cli
    from radflow.runtime import Runtime
    from radflow.settings import Settings

    assert radflow_cli(["status", "--json"]) == 0
    settings = Settings()
    with Runtime.open(settings) as rt:
        receiver = radflow.ingest.receiver.Receiver(
            settings, session_factory=rt.session_factory, store=rt.store, port=0
        )
        receiver.start()
        try:
            command = [storescu, "-aec", "RADFLOW", "127.0.0.1", str(receiver.port), *files]
            subprocess.run(command, check=False, timeout=60)
            assert receiver.wait_indexed(30)
        finally:
            receiver.stop()
    result = {
        "counters": receiver.counters.snapshot(),
        "incoming_left": sorted(path.name for path in receiver.spool.incoming.iterdir()),
        "fast_path_loaded": [name for name in FAST_PATH_MODULES if name in sys.modules],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
