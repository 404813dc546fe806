"""The project installs one import name, `tritongpt`: none of its folders (kernels, model, data,
trainer, bench) is importable under its own generic name, so other packages of those names
(Hugging Face's `kernels`, which transformers uses) import as themselves beside ours."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENERIC = ("kernels", "model", "data", "trainer", "bench")


def run_elsewhere(code, tmp_path):
    """Run python code in a fresh interpreter whose working directory is outside the repository."""
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_no_generic_top_level_name_is_ours(tmp_path):
    code = ("import importlib.util as u, json\n"
            f"print(json.dumps({{n: getattr(u.find_spec(n), 'origin', None) for n in {GENERIC!r}}}))")
    proc = run_elsewhere(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    import json
    origins = json.loads(proc.stdout)
    installed = os.path.abspath(sys.prefix) + os.sep  # CI's venv lives inside the repository
    ours = {n: o for n, o in origins.items()
            if o and os.path.abspath(o).startswith(REPO + os.sep) and not os.path.abspath(o).startswith(installed)}
    assert ours == {}, f"importable under a generic name from this repository: {ours}"


def test_tritongpt_is_the_import_name(tmp_path):
    code = ("import tritongpt, tritongpt.kernels, tritongpt.model, tritongpt.data.loader, tritongpt.trainer.options\n"
            "import tritongpt.bench.harness\n"
            "assert tritongpt.layer_norm is tritongpt.kernels.layer_norm\n"
            "print(tritongpt.kernels.__name__)")
    proc = run_elsewhere(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["tritongpt.kernels"]


def test_hugging_face_kernels_imports_beside_ours(tmp_path):
    """Hugging Face's `kernels` package (installed in CI) and tritongpt.kernels are two modules."""
    pytest.importorskip("kernels", reason="Hugging Face's kernels package is not installed")
    code = ("import kernels, tritongpt.kernels\n"
            "assert kernels is not tritongpt.kernels and hasattr(kernels, 'get_kernel')\n"
            "assert not hasattr(kernels, 'flash_attention')\n"
            "from tritongpt.kernels import flash_attention, layer_norm\n"
            "print('ok')")
    proc = run_elsewhere(code, tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
