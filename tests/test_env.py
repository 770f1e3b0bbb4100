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


def test_a_switch_set_to_an_unknown_value_is_warned_about_once(monkeypatch):
    """``true``/``yes`` for a ``1`` switch is off, and said so once, naming the variable; unset,
    empty and ``0`` are off silently."""
    import warnings

    import pytest

    from loraq.kernels import env

    monkeypatch.setattr(env, "_WARNED", set())
    for quiet in ("0", ""):
        monkeypatch.setenv("LORAQ_TEST_SWITCH", quiet)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not env_is("LORAQ_TEST_SWITCH", "1")
    monkeypatch.setenv("LORAQ_TEST_SWITCH", "true")
    match = r"LORAQ_TEST_SWITCH='true' is not understood: set LORAQ_TEST_SWITCH=1"
    with pytest.warns(RuntimeWarning, match=match) as w:
        assert not env_is("LORAQ_TEST_SWITCH", "1") and not env_is("LORAQ_TEST_SWITCH", "1")
    assert len(w) == 1
    monkeypatch.setattr(os, "environ", {"LORAQ_TEST_SWITCH": "on"})  # the slow path says the same
    with pytest.warns(RuntimeWarning, match=r"LORAQ_TEST_SWITCH='on' is not understood"):
        assert not env_is("LORAQ_TEST_SWITCH", "1")
