"""The documents cannot drift from the code: the flag table is the generated one, every
relative link and image resolves (anchors included), and every `python ...` command in a
shell block names an existing script and flags its argparser accepts (parsed only)."""
import argparse
import glob
import os
import re
import shlex

import pytest
from conftest import ROOT, train_main

DOCS = [os.path.join(ROOT, 'README.md'), os.path.join(ROOT, 'CHANGELOG.md')] + sorted(
    glob.glob(os.path.join(ROOT, 'docs', '*.md')))


def test_flag_table_is_the_generated_one():
    import utils
    text = open(os.path.join(ROOT, 'docs', 'training.md')).read()
    table = re.search(r"<!-- flags:begin -->\n(.*?)<!-- flags:end -->", text, re.S).group(1)
    assert table == utils.flags_markdown(), ("docs/training.md's flag table differs from "
                                             "`python utils.py --flags-markdown`: regenerate it")


def slug(heading):
    """GitHub's anchor of a markdown heading."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", '', s)
    return s.replace(' ', '-')


def anchors(path):
    text = open(path).read()
    text = re.sub(r"```.*?```", '', text, flags=re.S)
    return {slug(h) for h in re.findall(r"^#+ (.*)$", text, re.M)}


@pytest.mark.parametrize('doc', DOCS, ids=lambda p: os.path.relpath(p, ROOT))
def test_links_and_images_resolve(doc):
    text = re.sub(r"```.*?```", '', open(doc).read(), flags=re.S)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links or not doc.endswith('README.md')
    for link in links:
        if re.match(r"[a-z]+://", link) or link.startswith('mailto:'):
            continue
        path, _, anchor = link.partition('#')
        target = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
        assert os.path.exists(target), f"{os.path.relpath(doc, ROOT)}: {link} does not exist"
        assert os.path.commonpath([target, ROOT]) == ROOT, f"{link} points outside the repository"
        if anchor:
            assert anchor in anchors(target), f"{os.path.relpath(doc, ROOT)}: no heading #{anchor}"


class Parsed(Exception):
    pass


def _entry(script):
    """The function a script's command line goes through: f(argv)."""
    import evaluate
    table = {'train_mnist.py': lambda a: train_main(a, data='mnist'),
             'train_cifar10.py': lambda a: train_main(a, data='cifar10'),
             'TinyImagenet/train_tinyimagenet.py': lambda a: train_main(a, data='tinyimagenet'),
             'evaluate.py': evaluate.main,
             'TinyImagenet/evaluate_tinyimagenet.py': lambda a: evaluate.main(a, data='tinyimagenet')}
    if script in table:
        return table[script]
    if script == 'utils.py':
        return lambda a: None if a == ['--flags-markdown'] else pytest.fail(f"utils.py {a}")
    import importlib.util
    spec = importlib.util.spec_from_file_location(os.path.basename(script)[:-3],
                                                  os.path.join(ROOT, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def commands(doc):
    """Every `python ...` command line of the shell blocks of ``doc``: (script, argv)."""
    out = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", open(doc).read(), re.S):
        if lang not in ('', 'bash', 'sh'):
            continue
        for line in body.replace('\\\n', ' ').splitlines():
            line = line.split(' #')[0]
            words = shlex.split(line, comments=True)
            while words and '=' in words[0] and not words[0].startswith('-'):
                words = words[1:]           # VAR=value prefixes
            if '...' in words or not words:
                continue                    # an elided command line
            if words[0] == 'torchrun':
                words = ['python', '-m', 'torch.distributed.run'] + words[1:]
            if not re.fullmatch(r"(\S*/)?python3?", words[0]):
                continue
            words = words[1:]
            if words[:2] == ['-m', 'torch.distributed.run']:
                words = words[2:]
                while words and words[0].startswith('--'):
                    words = words[1:]       # torchrun's own options (--opt=value)
            elif words[:1] == ['-m']:
                continue                    # python -m pytest ...
            out.append((words[0], words[1:]))
    return out


def test_every_python_command_parses(monkeypatch):
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        real(self, args, namespace)
        raise Parsed()
    monkeypatch.setattr(argparse.ArgumentParser, 'parse_args', parse_then_stop)
    seen = 0
    for doc in DOCS:
        for script, argv in commands(doc):
            where = f"{os.path.relpath(doc, ROOT)}: python {script} {' '.join(argv)}"
            assert os.path.isfile(os.path.join(ROOT, script)), f"{where}: no script {script}"
            try:
                _entry(script)(argv)
            except Parsed:
                pass
            except SystemExit as e:
                pytest.fail(f"{where}: the argparser refused it (exit {e.code})")
            seen += 1
    assert seen >= 10


def layer_list(path, start, end):
    """The class names in the layer list of ``path`` between ``start`` and ``end``."""
    text = ' '.join(open(path).read().split())
    sentence = text.split(start, 1)[1].split(end, 1)[0]
    names = re.findall(r"\b(?:[A-Z][A-Za-z0-9]*(?:_x)?)\b", sentence)
    return set(names) - PROSE


PROSE = {'Any', 'CPU', 'GPU', 'CUDA', 'MaxMin', 'ValueError', 'SUPPORTED'}  # capitalised, not layers


@pytest.mark.parametrize('doc, start, end', [
    ('README.md', "Any `nn.Sequential` of ", "and so do **residual blocks**"),
    (os.path.join('docs', 'api.md'), "works on any `nn.Sequential` of ", "says the same")])
def test_layer_lists_are_the_codes(doc, start, end):
    """The README and docs/api.md name exactly the layer types the bound accepts."""
    from locallip.layers import SUPPORTED_NAMES
    found = layer_list(os.path.join(ROOT, doc), start, end)
    assert found == set(SUPPORTED_NAMES), (doc, sorted(found ^ set(SUPPORTED_NAMES)))


def module_name(rel: str) -> str:
    """'locallip/bound.py' -> 'locallip.bound', 'locallip/__init__.py' -> 'locallip',
    'utils.py' -> 'utils'."""
    name = rel[:-3].replace('/', '.')
    return name[:-len('.__init__')] if name.endswith('.__init__') else name


def project_imports():
    """{module: sorted project modules it imports} of the scripts at the root and the
    package's modules, from the AST (``from locallip import progress`` imports
    locallip.progress)."""
    import ast
    files = [os.path.relpath(p, ROOT) for pattern in ('*.py', 'locallip/*.py')
             for p in glob.glob(os.path.join(ROOT, pattern))]
    mods = {module_name(f): f for f in files}
    graph = {}
    for m, rel in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(open(os.path.join(ROOT, rel)).read())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in mods:
                subs = {f"{node.module}.{a.name}" for a in node.names} & set(mods)
                deps |= subs or {node.module}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in mods}
        graph[m] = sorted(deps - {m})
    return graph


def test_code_map_is_the_code():
    """docs/code.md lists every module with the project modules it imports, and the imports
    have no circle."""
    text = open(os.path.join(ROOT, 'docs', 'code.md')).read()
    table = re.search(r"<!-- imports:begin -->\n(.*?)<!-- imports:end -->", text, re.S).group(1)
    documented = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        module = module_name(cells[0].strip('`'))
        names = filter(None, map(str.strip, cells[2].split(',')))
        # a package module's row names its imports inside the package without the prefix
        inside = module.startswith('locallip')
        documented[module] = sorted(f"locallip.{n}" if inside else n for n in names)
    graph = project_imports()
    assert documented == graph, {m: (documented.get(m), graph.get(m))
                                 for m in set(documented) | set(graph)
                                 if documented.get(m) != graph.get(m)}
    done, active = set(), []

    def visit(m):
        assert m not in active, f"import circle: {' -> '.join(active + [m])}"
        if m not in done:
            active.append(m)
            for d in graph[m]:
                visit(d)
            active.pop()
            done.add(m)
    for m in graph:
        visit(m)


def test_layers_live_outside_the_argparser_module():
    import torch.nn as nn

    import utils
    assert not [k for k, v in vars(utils).items()
                if isinstance(v, type) and issubclass(v, nn.Module)]
