"""The project installs as one package: `pip install .` (a built wheel) or `pip install -e .`
adds the one top-level name `locallip`, and the README's own-model example runs from a
user's research folder that has its own models.py, utils.py and train.py; without the install
that script cannot import it."""
import glob
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

# a research folder's own modules, named as the generic names a flat layout would shadow
USER_MODULES = {name: f"raise ImportError('the user\\'s own {name}.py was imported')\n"
                for name in ('models', 'utils', 'train', 'evaluation', 'networks', 'errors')}


def own_model_script(folder, site_dir=None):
    """The README's 'Your own model' example as a user's script in ``folder``, next to the
    user's own models.py, utils.py, ... (with the install's site directory added, as the
    installed interpreter would read it)."""
    text = open(os.path.join(ROOT, 'README.md')).read()
    section = text[text.index('## Your own model'):]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    head = f"import site\nsite.addsitedir({site_dir!r})\n" if site_dir else ""
    os.makedirs(folder, exist_ok=True)
    for name, body in USER_MODULES.items():
        with open(os.path.join(folder, name + '.py'), 'w') as f:
            f.write(body)
    path = os.path.join(folder, 'own_model.py')
    with open(path, 'w') as f:
        f.write(head + example)
    return path


def run_outside(script, folder):
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    return subprocess.run([sys.executable, script], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=600)


def install(prefix, editable: bool) -> str:
    """pip install the clone (no dependencies: they are this interpreter's) into ``prefix``;
    returns its site-packages folder. The wheel is built from a copy of what the build reads
    (pyproject.toml, README.md, locallip/), so that no build/ folder is left in the clone."""
    source = ROOT
    if not editable:
        source = os.path.join(os.path.dirname(prefix), 'source')
        shutil.copytree(os.path.join(ROOT, 'locallip'), os.path.join(source, 'locallip'),
                        ignore=shutil.ignore_patterns('__pycache__'))
        for name in ('pyproject.toml', 'README.md'):
            shutil.copy(os.path.join(ROOT, name), source)
    what = ['-e', source] if editable else [source]
    p = subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps',
                        '--no-build-isolation', *what, '--prefix', prefix],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return glob.glob(os.path.join(prefix, 'lib', 'python*', 'site-packages'))[0]


def top_level_names(site_dir) -> set:
    """The importable names an install put into ``site_dir``: its folders and modules
    (.dist-info and the editable finder's own files aside), and the names the editable
    finder maps."""
    names = set()
    for entry in os.listdir(site_dir):
        if entry.endswith(('.dist-info', '.pth')) or entry == '__pycache__':
            continue
        if entry.startswith('__editable__'):
            text = open(os.path.join(site_dir, entry)).read()
            names |= set(re.findall(r"'(\w+)': ", text.split('MAPPING', 1)[-1][:2000]))
            continue
        names.add(entry[:-3] if entry.endswith('.py') else entry)
    return names


def test_not_importable_without_the_install(tmp_path):
    mine = str(tmp_path / 'mine')
    p = run_outside(own_model_script(mine), mine)
    assert p.returncode != 0 and "No module named 'locallip'" in p.stderr


@pytest.mark.parametrize('editable', [False, True], ids=['wheel', 'editable'])
def test_install_adds_one_name_and_runs_next_to_a_users_own_modules(tmp_path, editable):
    site_dir = install(str(tmp_path / 'prefix'), editable)
    assert top_level_names(site_dir) == {'locallip'}
    if not editable:            # the wheel holds the package itself, not the clone's scripts
        assert os.path.isfile(os.path.join(site_dir, 'locallip', 'bound.py'))
        assert not glob.glob(os.path.join(site_dir, '*.py'))
    mine = str(tmp_path / 'mine')
    p = run_outside(own_model_script(mine, site_dir), mine)
    assert p.returncode == 0, p.stderr[-3000:]
    assert 'certified radius' in p.stdout and 'local bound' in p.stdout


def test_the_package_imports_no_root_script():
    """The installed package cannot see the clone's scripts: no module of locallip/ imports
    utils, local_bound, data_load, evaluate, bench, plots or the training scripts."""
    root_scripts = {os.path.basename(f)[:-3] for f in glob.glob(os.path.join(ROOT, '*.py'))}
    found = []
    for path in glob.glob(os.path.join(ROOT, 'locallip', '*.py')):
        for m in re.findall(r'^\s*(?:from|import) (\w+)', open(path).read(), re.M):
            if m in root_scripts:
                found.append((os.path.basename(path), m))
    assert found == []
