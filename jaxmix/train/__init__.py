"""Training: state, step, loop, checkpoint, metrics, optimizer."""
from jaxmix.train.loop import run

__all__ = ["run"]
