"""Command-line manners of every tool of the package: ``--help`` shows usage and defaults and exits 0, an
unknown option exits 2 with a usage line, and the usage line names the command as it was invoked.

Each command runs as its invocation runs it (``runpy``, which is what ``python -m`` and ``python SCRIPT``
use), in this process, so the suite pays for one torch import; the installed console scripts run as real
processes in ``tests/test_packaging.py``.
"""

import argparse
import runpy
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# runpy warns when it re-runs a module the package already imported; `python -m` itself imports it only once
pytestmark = pytest.mark.filterwarnings('ignore:.*found in sys.modules after import of package:RuntimeWarning')

# (how a user invokes it, how to run it here); the usage line must start with the invocation.
COMMANDS = {
    'python -m timm_epsanet': ('module', 'timm_epsanet'),
    'python -m timm_epsanet.recipes': ('module', 'timm_epsanet.recipes'),
    'python -m timm_epsanet.publish': ('module', 'timm_epsanet.publish'),
    'python -m timm_epsanet.benchmark': ('module', 'timm_epsanet.benchmark'),
    'python -m timm_epsanet.run': ('module', 'timm_epsanet.run'),
    'hub_upload.py': ('script', str(REPO_ROOT / 'hub_upload.py')),
}

PUBLISH_ARGS = ['--model', 'epsanet50', '--checkpoint', 'model_best.pth.tar']
REQUIRED_ARGS = {
    'python -m timm_epsanet.recipes': ['epsanet50'],
    'python -m timm_epsanet.publish': PUBLISH_ARGS,
    'hub_upload.py': PUBLISH_ARGS,
    # an option before SCRIPT is the runner's; everything after SCRIPT is the script's
    'python -m timm_epsanet.run': ['train.py'],
}


def _invoke(command: str, args, monkeypatch, capsys):
    """Run ``command args...`` as the interpreter would; returns (exit status, stdout, stderr, parsers seen)."""
    kind, target = COMMANDS[command]
    parsers = []
    print_help = argparse.ArgumentParser.print_help

    def recording_print_help(self, file=None):  # remembers which parser answered --help
        parsers.append(self)
        return print_help(self, file)

    monkeypatch.setattr(argparse.ArgumentParser, 'print_help', recording_print_help)
    monkeypatch.setattr(sys, 'path', list(sys.path))  # hub_upload.py puts the repository root first
    # runpy sets argv[0] to the file it runs, as `python -m` and `python SCRIPT` do
    monkeypatch.setattr(sys, 'argv', ['-placeholder-', *args])
    with pytest.raises(SystemExit) as exit_info:
        if kind == 'module':
            runpy.run_module(target, run_name='__main__', alter_sys=True)
        else:
            runpy.run_path(target, run_name='__main__')
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err, parsers


@pytest.mark.parametrize('command', sorted(COMMANDS))
def test_help_shows_usage_and_exits_0(command, monkeypatch, capsys):
    code, out, err, _ = _invoke(command, ['--help'], monkeypatch, capsys)
    assert code == 0, err
    assert out.startswith(f'usage: {command} '), out.splitlines()[0]
    assert err == ''


@pytest.mark.parametrize('command', sorted(COMMANDS))
def test_unknown_option_exits_2_with_usage(command, monkeypatch, capsys):
    # with the required arguments given, so that the unknown option is what gets refused
    required = REQUIRED_ARGS.get(command, [])
    code, out, err, _ = _invoke(command, ['--no-such-option', *required], monkeypatch, capsys)
    assert code == 2
    assert out == ''
    assert err.startswith(f'usage: {command} ')
    assert err.splitlines()[-1] == f'{command}: error: unrecognized arguments: --no-such-option'


@pytest.mark.parametrize('command', sorted(COMMANDS))
def test_help_shows_every_default(command, monkeypatch, capsys):
    """Every option with a default (other than off/None) shows it in --help."""
    code, out, _, parsers = _invoke(command, ['--help'], monkeypatch, capsys)
    assert code == 0 and len(parsers) == 1
    squashed = ''.join(out.split())  # the formatter wraps long defaults at spaces and hyphens
    for action in parsers[0]._actions:
        if action.help == argparse.SUPPRESS or action.default in (None, False, argparse.SUPPRESS):
            continue
        assert ''.join(str(action.default).split()) in squashed, f'{action.option_strings}: {action.default!r}'


def test_runner_passes_options_after_the_script_to_it(tmp_path, monkeypatch, capsys):
    """``--help`` after SCRIPT is the script's: the runner runs the script with it instead of answering."""
    script = tmp_path / 'show_argv.py'
    script.write_text('import sys\nprint(sys.argv[1:])\n')
    from timm_epsanet.run import main

    monkeypatch.setattr(sys, 'argv', list(sys.argv))
    monkeypatch.setattr(sys, 'path', list(sys.path))
    main([str(script), '--help', '--model', 'epsanet50'])
    assert capsys.readouterr().out.strip() == "['--help', '--model', 'epsanet50']"


def test_recipes_unknown_model_exits_2_naming_the_recipes(monkeypatch, capsys):
    code, out, err, _ = _invoke('python -m timm_epsanet.recipes', ['resnet50'], monkeypatch, capsys)
    assert code == 2 and out == ''
    assert "No training recipe for 'resnet50'; recipes exist for: epsanet101" in err
