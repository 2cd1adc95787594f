"""Orbax checkpoints of the train state and the data-iterator state.

State (params, optimizer state, step) is saved with its shardings and restored into
whatever shardings the current mesh wants, so a checkpoint written under one mesh or
process count restores under another. The data iterator's state is saved per process
(grain's handler); when the process count changed it cannot be used, and the caller
re-positions the data by step instead.
"""
import json
import logging

import grain
import orbax.checkpoint as ocp

log = logging.getLogger("jaxmix")


class _Snapshot:
    """A data-iterator state captured at save time (saves may finish asynchronously)."""

    def __init__(self, state):
        self._state = json.dumps(state, indent=1).encode()

    def get_state(self):
        return self._state


class Checkpointer:
    def __init__(self, directory, keep=3, async_save=True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(
            directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler()})

    def latest_step(self):
        return self.manager.latest_step()

    def save(self, step, state, data_iter=None, force=False):
        """Saves the state and, when given, the data iterator's position."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_Snapshot(data_iter.get_state()))
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step, abstract_state, data_iter):
        """(state, data_restored: bool). The state lands in abstract_state's shardings."""
        state = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))["state"]
        try:
            self.manager.restore(step, args=ocp.args.Composite(
                data=grain.checkpoint.CheckpointRestore(data_iter)))
            return state, True
        except (ValueError, FileNotFoundError, KeyError) as e:
            log.warning("data-iterator state not restored (%s); re-positioning by step",
                        str(e).splitlines()[0])
            return state, False

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
