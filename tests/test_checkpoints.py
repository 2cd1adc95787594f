"""A latest checkpoint that does not restore never strands a run: it is reported, set
aside, and the one before it is used (jaxmix.workdir.Checkpointer.restore_latest)."""
import asyncio
import gc
import logging
import os
import shutil
import sys
import time

import jax
import numpy as np
import pytest

from jaxmix.errors import ConfigError
from jaxmix.train.loop import Run


def biggest_data_file(step_dir):
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state"))
             for f in fs if os.sep + "d" + os.sep in os.path.join(d, f) + os.sep
             or os.path.basename(d) == "d"]
    return max(files, key=os.path.getsize)


def damage(step_dir, kind):
    if kind == "overwritten data file":
        path = biggest_data_file(step_dir)
        raw = bytearray(open(path, "rb").read())
        raw[16:len(raw) - 16] = os.urandom(len(raw) - 32)
        open(path, "wb").write(bytes(raw))
    elif kind == "truncated data file":
        path = biggest_data_file(step_dir)
        os.truncate(path, os.path.getsize(path) // 2)
    elif kind == "missing metadata":
        os.remove(os.path.join(step_dir, "state", "_METADATA"))
        os.remove(os.path.join(step_dir, "state", "manifest.ocdbt"))
    elif kind == "empty step folder":
        shutil.rmtree(step_dir)
        os.mkdir(step_dir)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A workdir with checkpoints at steps 2 and 4 (different params)."""
    import mamba_lm
    workdir = tmp_path_factory.mktemp("ckpt")
    r = Run(mamba_lm.get_config("smoke"), str(workdir))
    state = r.init_fn()
    r.ckpt.save(2, state, r.data.train_iter)
    bumped = state.replace(step=state.step + 4,
                           params=jax.tree.map(lambda p: p + 1.0, state.params))
    r.ckpt.save(4, bumped, r.data.train_iter)
    r.ckpt.close()
    return workdir, jax.tree.map(np.asarray, state.params)


@pytest.mark.parametrize("kind", ["overwritten data file", "truncated data file",
                                  "missing metadata", "empty step folder"])
def test_damaged_latest_falls_back_to_the_one_before(saved, smoke_config, tmp_path, kind,
                                                     caplog, capfd, monkeypatch):
    """The damaged checkpoint is reported in one warning line naming the one restored
    instead, and the failed restore leaves nothing behind that prints a traceback
    later: no read still in flight whose coroutine a garbage collection would finish
    ("Exception ignored in", through sys.unraisablehook), or whose result would arrive
    in a closed event loop ("Event loop is closed")."""
    src, params2 = saved
    workdir = tmp_path / "w"
    shutil.copytree(src, workdir)
    damage(str(workdir / "checkpoints" / "4"), kind)
    r = Run(smoke_config, str(workdir))
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    capfd.readouterr()
    with caplog.at_level(logging.WARNING, logger="jaxmix"):
        state, _, start = r.initial_state()
    time.sleep(0.2)  # for reads still in flight, if any, to finish
    gc.collect()
    r.ckpt.close()
    err = capfd.readouterr().err
    assert not unraisable, [(u.object, u.exc_value) for u in unraisable][:3]
    assert "Traceback" not in err and "Event loop is closed" not in err, err[-3000:]
    assert start == 2 and int(state.step) == 0
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params), params2)
    warnings = [m for m in caplog.messages if "does not restore" in m]
    assert len(warnings) == 1 and "checkpoint step 4" in warnings[0] and "\n" not in warnings[0]
    assert "falling back to step 2" in warnings[0] and "TensorStore({" not in warnings[0]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4.damaged"]


def test_restore_event_loops_end_the_reads_left_in_flight(monkeypatch):
    """orbax runs each restore in a fresh event loop (run_until_complete, then close);
    when one read fails, the gather around the reads raises while the others are still
    pending. Under the loops Checkpointer.restore uses, those are cancelled and finished
    before the loop closes: none is left to be destroyed pending later (which prints an
    "Exception ignored in" traceback for each, orbax's read coroutines turning the
    GeneratorExit of their destruction into an exception)."""
    from jaxmix import workdir as workdir_lib
    unraisable, ended = [], []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)

    async def read(fails):
        try:
            await asyncio.sleep(0 if fails else 60)
            raise OSError("damaged")
        except BaseException as e:  # as orbax's reads do
            ended.append(type(e).__name__)
            raise Exception("could not read") from e

    async def read_all():
        return await asyncio.gather(read(True), read(False))

    def restore():
        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(read_all())
        finally:
            loop.close()

    with workdir_lib._draining_event_loops(), pytest.raises(Exception, match="could not"):
        restore()
    gc.collect()
    assert sorted(ended) == ["CancelledError", "OSError"] and not unraisable
    assert not isinstance(asyncio.new_event_loop(), workdir_lib._DrainingEventLoop)


def test_no_usable_checkpoint_is_one_error_line(saved, smoke_config, tmp_path):
    src, _ = saved
    workdir = tmp_path / "w"
    shutil.copytree(src, workdir)
    for step in ("2", "4"):
        damage(str(workdir / "checkpoints" / step), "empty step folder")
    r = Run(smoke_config, str(workdir))
    with pytest.raises(ConfigError) as e:
        r.initial_state()
    r.ckpt.close()
    msg = str(e.value)
    assert "\n" not in msg and "no checkpoint in" in msg and "steps 4, 2" in msg
    assert "another --workdir" in msg and "delete" in msg


def test_a_save_interrupted_half_way_is_not_taken_for_a_checkpoint(saved, smoke_config,
                                                                     tmp_path, caplog):
    """What kill -9 during an async save leaves: orbax's temporary step folder (renamed
    into place only when complete), here with half of step 4's files."""
    src, _ = saved
    workdir = tmp_path / "w"
    shutil.copytree(src, workdir)
    partial = workdir / "checkpoints" / "6.orbax-checkpoint-tmp-1764500000000"
    shutil.copytree(workdir / "checkpoints" / "4" / "state", partial / "state")
    os.remove(biggest_data_file(str(partial)))
    r = Run(smoke_config, str(workdir))
    with caplog.at_level(logging.WARNING, logger="jaxmix"):
        state, _, start = r.initial_state()
    r.ckpt.close()
    assert start == 4 and int(state.step) == 4
    assert not [m for m in caplog.messages if "does not restore" in m]
