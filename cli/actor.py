"""Who a command acts as: the operating-system user, or a dashboard user who proves it.

Recorded in the audit trail as ``os:<login name>`` (taken from the process's user id, not from
``$USER``, which anyone can set), or, with ``radflow --as NAME``, as that dashboard user once
their password is checked (throttled and audited like a dashboard login). Whoever can run
``radflow`` with the database's credentials can change the database anyway, so the
operating-system user acts as an admin; ``--as`` acts with that user's own role.
"""

from __future__ import annotations

import argparse
import getpass
import os
import pwd
import sys

from radflow.services.users import Principal, Role
from radflow.settings import Settings


def os_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # a container user without a passwd entry
        return f"uid-{os.geteuid()}"


def principal(args: argparse.Namespace, settings: Settings) -> Principal:
    """The acting principal of this command (asks for the password with ``--as``)."""
    name = getattr(args, "as_user", None)
    if not name:
        return Principal(f"os:{os_user()}", Role.ADMIN)
    from radflow.runtime import Runtime
    from radflow.services.users import LoginFailed, TooManyAttempts, authenticate

    if sys.stdin.isatty():
        password = getpass.getpass(f"Password of {name}: ")
    else:
        password = sys.stdin.readline().rstrip("\n")
    # Committed whatever the outcome: a wrong password counts and is audited.
    with Runtime.open(settings) as rt, rt.transaction() as session:
        try:
            return authenticate(session, settings, name, password, client=f"cli:{os_user()}")
        except (LoginFailed, TooManyAttempts) as exc:
            failure = exc
    raise failure
