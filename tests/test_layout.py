"""The shape of the code, from its own AST: short functions with few parameters, and the
argparse namespace kept out of the library's core."""
import ast
import glob
import os

from conftest import ROOT

MAX_LINES = 100           # no function longer (the declarative argument parsers aside)
MAX_PARAMS = 10           # no function with more parameters (the public API's keyword-only
#                           options aside)
PARSERS = {('utils.py', 'make_parser'), ('bench.py', 'make_parser')}
PUBLIC_API = 'locallip/api.py'
# the package's modules that never see the argparse namespace: all but flags.py (which turns
# it into settings) and the training loop's own (training, storage, schedule) and data.py
NAMESPACE_READERS = {'flags.py', 'training.py', 'storage.py', 'schedule.py', 'data.py'}
CORE = tuple(sorted('locallip/' + os.path.basename(f)
                    for f in glob.glob(os.path.join(ROOT, 'locallip', '*.py'))
                    if os.path.basename(f) not in NAMESPACE_READERS))


def code_files():
    """The project's Python files, relative to the root: the entry scripts and the package."""
    return sorted(os.path.relpath(p, ROOT) for pattern in ('*.py', 'locallip/*.py',
                                                            'TinyImagenet/*.py')
                  for p in glob.glob(os.path.join(ROOT, pattern)))


def functions():
    """(file, function node) of every function of the project's files."""
    for rel in code_files():
        tree = ast.parse(open(os.path.join(ROOT, rel)).read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield rel, node


def parameters(node):
    a = node.args
    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
    names += [p.arg for p in (a.vararg, a.kwarg) if p is not None]
    return [n for n in names if n not in ('self', 'cls')]


def test_functions_are_short():
    long = [(f, n.name, n.end_lineno - n.lineno + 1) for f, n in functions()
            if n.end_lineno - n.lineno + 1 > MAX_LINES and (f, n.name) not in PARSERS]
    assert long == [], long


def test_signatures_are_narrow():
    wide = []
    for f, n in functions():
        params = parameters(n)
        if f == PUBLIC_API and not n.name.startswith('_'):
            params = [p for p in params if p not in {k.arg for k in n.args.kwonlyargs}]
        if len(params) > MAX_PARAMS:
            wide.append((f, n.name, len(params)))
    assert wide == [], wide


def test_no_argparse_namespace_in_the_core():
    assert len(CORE) > 15
    found = [(f, n.name) for f, n in functions() if f in CORE and 'args' in parameters(n)]
    assert found == [], found


def test_root_modules_hand_on_every_public_name():
    """local_bound.py and data_load.py, kept at the root for the reference's imports, hand on
    every public name of the package module they stand for."""
    import data_load
    import local_bound
    from locallip import bound, data
    for shim, module in ((local_bound, bound), (data_load, data)):
        tree = ast.parse(open(module.__file__).read())
        public = {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
                  if isinstance(t, ast.Name)}
        public |= {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        public = {p for p in public if not p.startswith('_')}
        assert public - set(vars(shim)) == set(), (shim.__name__, sorted(public - set(vars(shim))))
