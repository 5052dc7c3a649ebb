"""The shape of the code, from its own AST: short functions with few parameters, and the
argparse namespace kept out of the core modules."""
import ast
import glob
import os

from conftest import ROOT

MAX_LINES = 100           # no function longer (the declarative argument parsers aside)
MAX_PARAMS = 10           # no function with more parameters (the public API's keyword-only
#                           options aside)
PARSERS = {('utils.py', 'make_parser'), ('bench.py', 'make_parser')}
PUBLIC_API = 'locallip.py'
CORE = ('local_bound.py', 'lanczos.py', 'certify.py', 'locallip.py', 'radius.py',
        'evaluation.py', 'vectors.py', 'models.py', 'report.py', 'attacks.py')


def functions():
    """(file, function node) of every function of the top-level modules."""
    for path in sorted(glob.glob(os.path.join(ROOT, '*.py'))):
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield os.path.basename(path), node


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
    found = [(f, n.name) for f, n in functions() if f in CORE and 'args' in parameters(n)]
    assert found == [], found
