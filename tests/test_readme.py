"""The README's commands run as written, in order, in a fresh folder at smoke size
(tests/readme_harness.py says how): each must succeed and write only into the folder
it was asked to write.

The default run covers the sections whose commands chain into each other (the main
job, fine-tuning an imported Hugging Face model and exporting it back, mixture-of-head
attention started from a dense model, the other entry points); every section, in
order, runs with `-m exhaustive` (about 9 minutes on 2 cores)."""
import os

import pytest

from conftest import ROOT
from readme_harness import run_markdown

README = os.path.join(ROOT, "README.md")
CHAINED = ("Set up", "Fine-tuning a Hugging Face model", "Mixture-of-head attention (MoH)",
           "Other entry points")


@pytest.mark.slow
def test_readme_chained_sections_run_as_written(tmp_path):
    box = run_markdown(README, tmp_path / "box", sections=CHAINED)
    assert any("runs/finetune-imported" in line for line in box.log)
    assert os.path.isdir(tmp_path / "box" / "runs" / "finetune-imported" / "checkpoints")
    # the imported model, fine-tuned without --workdir, is left as it was converted
    assert sorted(os.listdir(tmp_path / "box" / "runs" / "imported")) == [
        "checkpoints", "config.json", "tokenizer"]


@pytest.mark.exhaustive
def test_readme_runs_as_written(tmp_path):
    run_markdown(README, tmp_path / "box")
