"""The project installs as the ecosystem expects: `pip install -e .` makes the modules
importable from a user's own folder (the README's own-model example, saved outside the clone,
runs), and without the install that script cannot import them."""
import glob
import os
import re
import subprocess
import sys

from conftest import ROOT


def own_model_script(folder, site_dir=None):
    """The README's 'Your own model' example as a user's script in ``folder`` (with the
    install's site directory added, as the installed interpreter would read it)."""
    text = open(os.path.join(ROOT, 'README.md')).read()
    section = text[text.index('## Your own model'):]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    head = f"import site\nsite.addsitedir({site_dir!r})\n" if site_dir else ""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, 'own_model.py')
    with open(path, 'w') as f:
        f.write(head + example)
    return path


def run_outside(script, folder):
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    return subprocess.run([sys.executable, script], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=600)


def test_editable_install_imports_from_anywhere(tmp_path):
    mine = str(tmp_path / 'mine')
    p = run_outside(own_model_script(mine), mine)        # not installed: not importable
    assert p.returncode != 0 and "No module named 'locallip'" in p.stderr
    prefix = str(tmp_path / 'prefix')
    p = subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps',
                        '--no-build-isolation', '-e', ROOT, '--prefix', prefix],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    site_dir = glob.glob(os.path.join(prefix, 'lib', 'python*', 'site-packages'))[0]
    assert glob.glob(os.path.join(site_dir, '__editable__*locallip*.pth'))
    p = run_outside(own_model_script(mine, site_dir), mine)
    assert p.returncode == 0, p.stderr[-3000:]
    assert 'certified radius' in p.stdout and 'local bound' in p.stdout


def test_pyproject_lists_every_top_level_module():
    """A module left out of py-modules would be missing from an install (the editable one
    included), although every test run from the clone finds it."""
    text = open(os.path.join(ROOT, 'pyproject.toml')).read()
    listed = set(re.findall(r'"(\w+)"', re.search(r"py-modules = \[(.*?)\]", text, re.S).group(1)))
    present = {os.path.basename(f)[:-3] for f in glob.glob(os.path.join(ROOT, '*.py'))}
    assert listed == present, sorted(listed ^ present)
