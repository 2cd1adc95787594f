"""What the training loop does after a step whose loss or gradient norm was not finite.

The train step itself never lets such a step reach the params or the optimizer state
(`step.NONFINITE`: it keeps the old ones and reports which params' gradients were not
finite). `train.nonfinite` then decides:
  "stop" (default)  the run stops with exit status 3 and one line naming the step, the
                    params with non-finite gradients and the last good checkpoint;
                    nothing is saved after that step;
  "skip"            the update is dropped and training goes on; after
                    `train.nonfinite_max` such steps in a row the run stops as above.
"""
import logging
import os

import jax
import numpy as np

from jaxmix.errors import NonFiniteError
from jaxmix.train.step import NONFINITE

log = logging.getLogger("jaxmix")
POLICIES = ("stop", "skip")
MAX_NAMES = 3


class NonFiniteGuard:
    def __init__(self, train_cfg, param_names, ckpt, workdir):
        self.policy = train_cfg.get("nonfinite", "stop")
        self.max_in_row = int(train_cfg.get("nonfinite_max", 10))
        self.param_names, self.ckpt, self.workdir = list(param_names), ckpt, workdir
        self.in_row = self.skipped = 0

    def check_step(self, step, metrics):
        """`check` on a train step's metrics (device arrays: waits for that step)."""
        finite, flags, loss, norm = jax.device_get(
            (metrics["finite"], metrics[NONFINITE], metrics["loss"], metrics["grad_norm"]))
        self.check(step, finite, flags, float(loss), float(norm))

    def check(self, step, finite, flags, loss, grad_norm):
        """Host values of one step: raises NonFiniteError when the run must stop."""
        if bool(finite):
            self.in_row = 0
            return
        self.in_row += 1
        self.skipped += 1
        if self.policy == "skip" and self.in_row < self.max_in_row:
            log.warning("step %d: loss %.4g, gradient norm %.4g: update skipped (%d in a "
                        "row, %d in all)", step, loss, grad_norm, self.in_row, self.skipped)
            return
        raise NonFiniteError(self.diagnosis(step, np.asarray(flags), loss, grad_norm))

    def diagnosis(self, step, flags, loss, grad_norm):
        bad = [self.param_names[i] if i < len(self.param_names) else f"#{i}"
               for i in np.flatnonzero(flags)]
        where = (f"non-finite gradients in {', '.join(bad[:MAX_NAMES])}"
                 + (f" and {len(bad) - MAX_NAMES} more params" if len(bad) > MAX_NAMES else "")
                 if bad else "a non-finite loss with finite gradients")
        last = self.ckpt.latest_step()
        kept = (f"the last good checkpoint is step {last} in "
                f"{os.path.join(self.workdir, 'checkpoints')}" if last is not None
                else "no checkpoint was saved before it")
        row = f"{self.in_row} steps in a row, " if self.policy == "skip" else ""
        return (f"step {step}: loss {loss:.4g}, gradient norm {grad_norm:.4g} ({row}{where}); "
                f"no non-finite update reached the params, {kept}; lower "
                f"train.learning_rate, keep train.grad_clip > 0, or set "
                f"train.nonfinite='skip'")
