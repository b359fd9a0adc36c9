"""A saved MIDUS model loaded with trust_remote_code where midus_ops is missing: our message."""
import os
import subprocess
import sys
import warnings

warnings.filterwarnings("ignore", message=".*midus_ops.*")

import midus  # noqa: E402
from conftest import make_tiny_llama  # noqa: E402


def test_missing_midus_ops_names_the_package_to_install(tmp_path):
    midus.upscale(make_tiny_llama(300), "midus", 1).save_pretrained(tmp_path / "m")
    fake = tmp_path / "fake"  # a midus_ops that cannot be imported, first on the path
    (fake / "midus_ops").mkdir(parents=True)
    (fake / "midus_ops" / "__init__.py").write_text("raise ImportError('midus_ops is not installed here')\n")
    code = ("import sys\nfrom transformers import AutoModelForCausalLM\n"
            "AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n")
    env = dict(os.environ, PYTHONPATH=str(fake), HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], capture_output=True, text=True,
                          env=env, cwd=str(tmp_path), timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "midus" in last and "pip install --no-build-isolation" in last, proc.stderr[-2000:]
    assert "pip install midus_ops" not in proc.stderr
