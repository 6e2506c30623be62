"""Cheap argon2 parameters for these tests: the real ones cost ~0.5 s per hash on 2 busy cores.

Only the cost parameters change (the hashes are still argon2id, verified by argon2-cffi); the
production parameters are used by the browser test, which runs the dashboard as a real server.
"""

from __future__ import annotations

import pytest
from argon2 import PasswordHasher
from argon2.profiles import CHEAPEST

from radflow.services import users


@pytest.fixture(autouse=True)
def cheap_password_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    hasher = PasswordHasher.from_parameters(CHEAPEST)
    monkeypatch.setattr(users, "_HASHER", hasher)
    monkeypatch.setattr(users, "_DUMMY_HASH", hasher.hash("radflow-no-such-user"))
