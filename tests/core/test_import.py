import subprocess
import sys


def test_import_loads_nothing_heavy():
    code = (
        "import sys, qie; heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules];"
        "assert not heavy, heavy; assert qie.QieError; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_lazy_names_resolve():
    import qie

    assert qie.EditRequest.__name__ == "EditRequest"
    assert callable(qie.get_editor)
