"""StopRequest, the loop's signal handling on one process: SIGTERM or a first Ctrl-C
asks the run to stop after its step; a second Ctrl-C stops it at once."""
import os
import signal

import pytest

from jaxmix.train.preempt import StopRequest


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_asks_to_stop_at_the_next_step(sig):
    before = signal.getsignal(sig)
    stop = StopRequest().install()
    try:
        assert not stop.reached(1) and stop.name is None
        os.kill(os.getpid(), sig)
        assert stop.reached(2) and stop.name == sig.name
    finally:
        stop.restore()
    assert signal.getsignal(sig) is before


def test_a_second_ctrl_c_stops_at_once():
    stop = StopRequest().install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
