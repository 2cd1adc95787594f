"""JAXMIX_REQUIRE_HF (set by .ci/run): a missing torch or transformers fails the tests
that need it instead of skipping them; without the variable they skip as before. Each
case runs pytest in a subprocess whose `torch` import is blocked (sys.modules entry
None), on two throwaway test files using tests/conftest.py as a plugin."""
import os
import subprocess
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))

MODULE_LEVEL = 'import pytest\ntorch = pytest.importorskip("torch")\n\ndef test_a():\n    pass\n'
IN_TEST = ('import pytest\n\ndef test_b():\n    pytest.importorskip("torch")\n\n'
           'def test_other_module_still_skips():\n    pytest.importorskip("no_such_module_x")\n')


def run_blocked(tmp_path, require):
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_module_level.py").write_text(MODULE_LEVEL)
    (tmp_path / "test_in_test.py").write_text(IN_TEST)
    code = ("import sys; sys.modules['torch'] = None; import pytest; "
            f"sys.exit(pytest.main(['-q', '-rA', '-p', 'no:cacheprovider', '-p', 'conftest', "
            "'--continue-on-collection-errors', "
            f"'-c', {str(tmp_path / 'pytest.ini')!r}, {str(tmp_path)!r}]))")
    env = dict(os.environ, PYTHONPATH=TESTS, JAXMIX_REQUIRE_HF="1" if require else "")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)


@pytest.mark.parametrize("require", [False, True], ids=["local", "ci"])
def test_missing_torch_skips_locally_and_fails_in_ci(tmp_path, require):
    proc = run_blocked(tmp_path, require)
    out = proc.stdout + proc.stderr
    if not require:
        assert proc.returncode == 0, out
        assert "3 skipped" in out, out
        return
    assert proc.returncode != 0, out
    assert "JAXMIX_REQUIRE_HF is set but 'torch' is unavailable" in out, out
    assert "FAILED" in out and "test_b" in out, out          # the call inside a test
    assert "ERROR" in out and "test_module_level" in out, out  # the module-level call
    assert "1 skipped" in out, out                              # other modules still skip
