"""Every ```python and ```bash block of README.md runs as pasted, so the README cannot drift from the code.

Each block runs in a fresh scratch copy of the checkout (the README's commands are written for the
repository root), with this interpreter's ``bin/`` first on ``PATH`` (``python``, ``pip``, ``ruff``) and
``HF_HUB_OFFLINE=1``. A bash block runs under ``bash -e -o pipefail``; a python block runs as a script.
A block that needs a GPU, the network, a dataset or timm's repository scripts carries, on the line right
before its opening fence, ``<!-- readme-test: skip: <reason> -->``; the test reports it as skipped with
that reason. The one substitution (``TINY``) shrinks the benchmark's commands to tiny sizes; README.md's
Development section documents both. About 170 s of CPU time, 48 s of it the ONNX export block.
"""

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
README = REPO_ROOT / 'README.md'

SKIP_MARK = re.compile(r'^<!-- readme-test: skip: (?P<reason>\S.*?) -->$')
OPEN_FENCE = re.compile(r'^(?P<indent> *)```(?P<lang>\w+)\s*$')

# Appended to every `python -m timm_epsanet.benchmark` command (later options win in argparse): tiny sizes,
# so the README's benchmark commands check that they run, not how fast.
TINY = {
    'python -m timm_epsanet.benchmark': (
        '--models epsanet50,epsanet50:reference --img-size 64 --batch-sizes 1 --train-batch-sizes 2 '
        '--formats nchw --rounds 1 --iters 1 --warmup 0 --no-memory'
    ),
}
# what a scratch checkout leaves out
_NOT_SOURCE = shutil.ignore_patterns('.git', '.venv', 'venv', 'build', 'dist', '*.egg-info', '__pycache__', '.*cache')


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: str  # reason from the skip mark, '' to run

    @property
    def id(self) -> str:
        return f'README.md:{self.line}:{self.lang}'


def readme_blocks(text: str) -> List[Block]:
    """The fenced python and bash blocks of ``text``, dedented to their fence (list items indent them)."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = OPEN_FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, start = opening['indent'], i
        i += 1
        while i < len(lines) and lines[i] != f'{indent}```':
            i += 1
        if i == len(lines):
            raise ValueError(f'README.md:{start + 1}: code block is not closed')
        body = [line[len(indent) :] if line.startswith(indent) else line.lstrip() for line in lines[start + 1 : i]]
        mark = SKIP_MARK.match(lines[start - 1].strip()) if start else None
        if opening['lang'] in ('python', 'bash'):
            blocks.append(Block(start + 1, opening['lang'], '\n'.join(body) + '\n', mark['reason'] if mark else ''))
        i += 1
    return blocks


def shrink(code: str) -> str:
    """Apply ``TINY`` to each command of a bash block (continuation lines joined first)."""
    commands = code.replace('\\\n', ' ').splitlines()
    for i, command in enumerate(commands):
        for prefix, options in TINY.items():
            if command.lstrip().startswith(prefix):
                body, hash_, comment = command.partition(' #')
                commands[i] = f'{body.rstrip()} {options}{hash_}{comment}'
    return '\n'.join(commands) + '\n'


BLOCKS = readme_blocks(README.read_text())


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A scratch copy of the checkout, as a user has it after cloning."""
    path = tmp_path / 'timm-epsanet'
    shutil.copytree(REPO_ROOT, path, ignore=_NOT_SOURCE)
    return path


@pytest.mark.parametrize('block', BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block_runs(block: Block, checkout: Path):
    if block.skip:
        pytest.skip(block.skip)
    env = dict(os.environ, HF_HUB_OFFLINE='1', PYTHONDONTWRITEBYTECODE='1')
    env['PATH'] = os.pathsep.join([str(Path(sys.executable).parent), env.get('PATH', '')])
    if block.lang == 'python':
        script = checkout.parent / 'readme_block.py'
        script.write_text(block.code)
        cmd = [sys.executable, str(script)]
    else:
        cmd = ['bash', '-e', '-o', 'pipefail', '-c', shrink(block.code)]
    proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, f'{block.id} failed:\n{block.code}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}'


def test_blocks_are_found_and_skips_have_reasons():
    """The parser sees every fence: a skip mark without a reason, or on no block, is a mistake."""
    text = README.read_text()
    fences = [line for line in text.splitlines() if re.match(r'^ *```(python|bash)\s*$', line)]
    assert len(BLOCKS) == len(fences) > 0
    marks = [line for line in text.splitlines() if line.lstrip().startswith('<!-- readme-test:')]
    assert len(marks) == sum(bool(b.skip) for b in BLOCKS), (
        'a readme-test mark is malformed or not right before a fence'
    )


def test_parser_on_a_sample():
    sample = (
        'text\n```python\nprint(1)\n```\n'
        '<!-- readme-test: skip: needs a GPU -->\n```bash\nnvidia-smi\n```\n'
        '1. item\n\n   ```bash\n   python -m timm_epsanet.benchmark --threads 2 \\\n       --rounds 5  # note\n   ```\n'
        '```text\nnot code\n```\n'
    )
    blocks = readme_blocks(sample)
    assert [(b.line, b.lang, b.skip) for b in blocks] == [
        (2, 'python', ''),
        (6, 'bash', 'needs a GPU'),
        (11, 'bash', ''),
    ]
    assert blocks[2].code == 'python -m timm_epsanet.benchmark --threads 2 \\\n    --rounds 5  # note\n'
    tiny = TINY['python -m timm_epsanet.benchmark']
    assert shrink(blocks[2].code) == f'python -m timm_epsanet.benchmark --threads 2      --rounds 5 {tiny} # note\n'


def test_models_table_is_what_the_zoo_prints(capsys):
    """README's model table is the output of `python -m timm_epsanet` (cells compared, padding aside)."""
    from timm_epsanet.__main__ import main

    def cells(text: str) -> List[List[str]]:
        rows = [line for line in text.splitlines() if line.startswith('| epsanet')]
        return [[c.strip() for c in row.strip('|').split('|')] for row in rows]

    main([])
    printed = cells(capsys.readouterr().out)
    assert len(printed) == 4
    assert cells(README.read_text().split('## Models', 1)[1].split('\n## ', 1)[0]) == printed
