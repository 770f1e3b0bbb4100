"""``kernels/env.py``: the launch path's switches read from the environment as it is now."""

import os

from loraq.kernels.env import env_is


def test_env_is_follows_every_change(monkeypatch):
    monkeypatch.delenv("LORAQ_TEST_SWITCH", raising=False)
    assert not env_is("LORAQ_TEST_SWITCH", "1")
    monkeypatch.setenv("LORAQ_TEST_SWITCH", "1")
    assert env_is("LORAQ_TEST_SWITCH", "1") and not env_is("LORAQ_TEST_SWITCH", "0")
    os.environ["LORAQ_TEST_SWITCH"] = "0"
    assert env_is("LORAQ_TEST_SWITCH", "0") and not env_is("LORAQ_TEST_SWITCH", "1")
    del os.environ["LORAQ_TEST_SWITCH"]
    assert not env_is("LORAQ_TEST_SWITCH", "0")
    monkeypatch.setenv("LORAQ_TEST_SWITCH", "é")  # non-ASCII values encode as os.environ does
    assert env_is("LORAQ_TEST_SWITCH", "é")


def test_env_is_reads_a_replaced_environ(monkeypatch):
    """A test framework may swap ``os.environ`` for a plain mapping."""
    monkeypatch.setattr(os, "environ", {"LORAQ_TEST_SWITCH": "1"})
    assert env_is("LORAQ_TEST_SWITCH", "1") and not env_is("LORAQ_OTHER", "1")
