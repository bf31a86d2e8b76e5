"""How long an idle runner waits before its next round."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from runjobs.actions import Registry
from runjobs.config import load_settings
from runjobs.runner import Runner
from tests.conftest import write_config


@pytest.fixture
def runner(environ, store):
    write_config(Path(environ["RUNJOBS_HOME"]), 'poll_interval = "1s"\n')
    settings = load_settings(environ)
    return Runner(settings, store, Registry(settings))


def test_polls_are_poll_interval_apart_from_round_start_to_round_start(runner):
    """A round that took 0.3 s leaves 0.7 s of a 1 s poll interval: a job due
    just after a round then waits at most the interval, not more."""
    waited = runner._wait_time(None, time.monotonic() - 0.3)
    assert 0.6 <= waited <= 0.7


def test_an_idle_round_comes_a_little_before_the_interval_is_up(runner):
    """20 ms early with a 1 s interval: what a round does before its claim
    varies by a few ms, and a job's wait must stay within the interval."""
    waited = runner._wait_time(None, time.monotonic())
    assert 0.95 <= waited <= 0.981


def test_wait_is_never_negative_and_stops_at_the_deadline(runner):
    assert runner._wait_time(None, time.monotonic() - 5) == 0.0
    deadline = runner.clock.wall() + 0.2
    assert 0.0 < runner._wait_time(deadline, time.monotonic()) <= 0.2
