"""The package as pip builds and installs it: LICENSE in the sdist and the wheel, console scripts that work.

Offline and cheap: the sdist and wheel are built by setuptools' PEP 517 hooks without build isolation, and
the install goes into a throwaway virtual environment that sees this interpreter's packages (torch, timm,
...) through a ``.pth`` file, with ``--no-index``, so nothing is downloaded and this environment is not
touched. About 25 s on 2 cores.
"""

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

import timm_epsanet

REPO_ROOT = Path(__file__).resolve().parent.parent
LICENSE = (REPO_ROOT / 'LICENSE').read_text()
DIST = f'timm_epsanet-{timm_epsanet.__version__}'
CONSOLE_SCRIPTS = {
    'epsanet-hub-upload': ['--model', 'epsanet50', '--checkpoint', 'model_best.pth.tar'],
    'epsanet-zoo': [],
    'epsanet-run': ['train.py'],
}
# what a build must not pick up from a developer's checkout
_NOT_SOURCE = shutil.ignore_patterns('.git', '.venv', 'venv', 'build', 'dist', '*.egg-info', '__pycache__', '.*cache')


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    # without PYTHONPATH, which may put a checkout before what is installed
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, env=env, **kwargs)


@pytest.fixture(scope='module')
def source(tmp_path_factory) -> Path:
    """A copy of the source tree: setuptools builds in place and leaves build/ and *.egg-info behind."""
    path = tmp_path_factory.mktemp('src') / 'timm-epsanet'
    shutil.copytree(REPO_ROOT, path, ignore=_NOT_SOURCE)
    return path


def _build(source: Path, hook: str) -> Path:
    out = source.parent / 'dist'
    code = f'from setuptools import build_meta; print(build_meta.{hook}({str(out)!r}))'
    proc = _run([sys.executable, '-c', code], cwd=source)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / proc.stdout.strip().splitlines()[-1]


def test_sdist_has_the_license_and_the_recipes(source):
    sdist = _build(source, 'build_sdist')
    with tarfile.open(sdist) as tar:
        names = set(tar.getnames())
        assert tar.extractfile(f'{DIST}/LICENSE').read().decode() == LICENSE
    assert f'{DIST}/timm_epsanet/recipes/epsanet50_authors.yaml' in names


def test_wheel_has_the_license_the_recipes_and_the_console_scripts(source):
    wheel = _build(source, 'build_wheel')
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        assert whl.read(f'{DIST}.dist-info/licenses/LICENSE').decode() == LICENSE
        metadata = whl.read(f'{DIST}.dist-info/METADATA').decode()
        entry_points = whl.read(f'{DIST}.dist-info/entry_points.txt').decode()
    assert 'License-Expression: Apache-2.0' in metadata.splitlines()
    assert 'timm_epsanet/recipes/epsanet50_authors.yaml' in names
    assert not any(n.startswith(('tests/', 'hub_upload')) for n in names)  # the checkout's extras stay out
    for script in CONSOLE_SCRIPTS:
        assert f'{script} = timm_epsanet.' in entry_points


@pytest.fixture(scope='module')
def venv(source, tmp_path_factory) -> Path:
    """``pip install .`` into a new virtual environment; returns its bin/ folder."""
    root = tmp_path_factory.mktemp('venv')
    proc = _run([sys.executable, '-m', 'venv', '--without-pip', str(root)])
    assert proc.returncode == 0, proc.stderr
    purelib = Path(sysconfig.get_path('purelib', vars={'base': str(root), 'platbase': str(root)}))
    # this interpreter's packages (pip, setuptools, torch, timm, ...) after the new environment's own
    (purelib / 'parent-environment.pth').write_text('\n'.join(site.getsitepackages()) + '\n')
    bin_dir = root / ('Scripts' if os.name == 'nt' else 'bin')
    python = bin_dir / Path(sys.executable).name
    pip = [str(python), '-m', 'pip', 'install', '--no-index', '--no-build-isolation', '--quiet', str(source)]
    proc = _run(pip, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return bin_dir


# Runs installed scripts in one interpreter (one torch import instead of one per run): each as its own
# process would, from its file with its path as argv[0]; prints the package's file and, per run,
# [exit status, stdout, stderr].
_DRIVER = """
import contextlib, io, json, runpy, sys
results = []
for argv in json.loads(sys.argv[1]):
    out, err, code = io.StringIO(), io.StringIO(), 0
    sys.argv = argv
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(argv[0], run_name='__main__')
        except SystemExit as e:
            code = e.code
    results.append([code, out.getvalue(), err.getvalue()])
print(json.dumps([sys.modules['timm_epsanet'].__file__, results]))
"""


def test_console_scripts_answer_help_and_refuse_unknown_options(venv, tmp_path):
    """Each installed script: --help exits 0 with a usage line naming it; an unknown option exits 2."""
    python = venv / Path(sys.executable).name
    runs = []
    for script, required in CONSOLE_SCRIPTS.items():
        path = venv / script
        assert path.read_text().splitlines()[0] == f'#!{python}'  # pip's launcher runs the environment's python
        runs += [[str(path), '--help'], [str(path), '--no-such-option', *required]]
    proc = _run([str(python), '-c', _DRIVER, json.dumps(runs)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    package_file, results = json.loads(proc.stdout.splitlines()[-1])
    assert Path(package_file).is_relative_to(venv.parent), package_file  # the installed copy, not a checkout
    results = iter(results)
    for script in CONSOLE_SCRIPTS:
        (shown_code, shown, _), (refused_code, _, refused) = next(results), next(results)
        assert shown_code == 0 and shown.startswith(f'usage: {script} '), shown[:200]
        assert refused_code == 2 and refused.startswith(f'usage: {script} '), refused[-500:]
        assert refused.splitlines()[-1] == f'{script}: error: unrecognized arguments: --no-such-option'
