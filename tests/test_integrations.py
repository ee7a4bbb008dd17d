"""regfuse.integrations without any framework: imported only when asked for."""
import os
import subprocess
import sys

import pytest

from regfuse.integrations import require


def test_import_regfuse_imports_no_framework():
    code = ("import sys, regfuse; bad = [m for m in ('accelerate', 'transformers', 'lightning', "
            "'pytorch_lightning', 'regfuse.integrations') if m in sys.modules]; assert not bad, bad")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=env)


def test_a_missing_framework_says_what_to_install():
    with pytest.raises(ImportError, match=r"regfuse.integrations.demo needs nopkg \(pip install nopkg\)"):
        require("regfuse_no_such_module", "nopkg", "demo")
