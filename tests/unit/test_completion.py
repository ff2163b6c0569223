"""``basaltctl completion``: the scripts, the completion protocol as the shells speak it
(``_BASALTCTL_COMPLETE``, ``COMP_WORDS``, ``COMP_CWORD``) against the installed
``basaltctl``, and the bash script run by a real bash."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from basalt.cli.main import main

BIN = Path(sys.executable).parent
BASALTCTL = BIN / "basaltctl"


def _script(shell: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["completion", shell]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_each_shell_gets_its_script(shell: str, capsys: pytest.CaptureFixture[str]) -> None:
    script = _script(shell, capsys)
    assert f"_BASALTCTL_COMPLETE={shell}_complete" in script
    assert "basaltctl" in script
    checker = {"bash": ["bash", "-n"], "zsh": ["zsh", "-n"], "fish": ["fish", "--no-execute"]}
    tool = checker[shell]
    if shutil.which(tool[0]) is None:
        if shell == "bash":
            pytest.fail("bash is needed to check the bash script")
        return  # zsh and fish are optional on the test host
    result = subprocess.run([*tool], input=script, text=True, capture_output=True, check=False)
    assert result.returncode == 0, result.stderr


def test_an_unknown_shell_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["completion", "tcsh"]) == 1
    err = capsys.readouterr().err
    assert "no completion for shell 'tcsh'" in err
    assert "bash, zsh, fish" in err


def _complete(words: str, cword: int, instruction: str = "bash_complete") -> list[str]:
    env = {
        **os.environ,
        "_BASALTCTL_COMPLETE": instruction,
        "COMP_WORDS": words,
        "COMP_CWORD": str(cword),
    }
    result = subprocess.run(
        [str(BASALTCTL)], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_the_bash_protocol_completes_verbs_groups_and_options() -> None:
    verbs = _complete("basaltctl ", 1)
    for verb in ("plain,dashboard", "plain,etcd", "plain,meta", "plain,wipe", "plain,get"):
        assert verb in verbs
    assert _complete("basaltctl da", 1) == ["plain,dashboard"]
    assert "plain,members" in _complete("basaltctl etcd ", 2)
    assert set(_complete("basaltctl meta ", 2)) >= {"plain,read", "plain,write", "plain,delete"}
    options = _complete("basaltctl wipe disk vdb --", 4)
    assert {"plain,--method", "plain,--yes", "plain,--nodes"} <= set(options)
    assert "plain,--basaltconfig" in _complete("basaltctl --", 1)  # global options
    assert _complete("basaltctl etcd ", 2, "complete_bash") == _complete("basaltctl etcd ", 2)


def test_zsh_and_fish_answers_carry_the_help() -> None:
    zsh = _complete("basaltctl meta read --", 3, "zsh_complete")
    at = zsh.index("--nodes")
    assert zsh[at - 1] == "plain" and "Target nodes" in zsh[at + 1]
    fish = _complete("basaltctl --", 1, "fish_complete")
    assert any(line.startswith("--debug\tShow stack traces") for line in fish)


def test_a_bad_instruction_is_refused() -> None:
    env = {**os.environ, "_BASALTCTL_COMPLETE": "tcsh_complete"}
    result = subprocess.run([str(BASALTCTL)], env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert "is not a completion request" in result.stderr


def test_completing_the_verb_imports_no_verb_module() -> None:
    code = (
        "import os, sys\n"
        "from basalt.cli.main import main\n"
        "os.environ.update(_BASALTCTL_COMPLETE='bash_complete', COMP_WORDS='basaltctl e',"
        " COMP_CWORD='1')\n"
        "main([])\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('basalt.cli.') and m not in"
        " ('basalt.cli.main', 'basalt.cli._common', 'basalt.cli.completion'))\n"
        "print('LOADED', loaded, 'grpc' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert "LOADED [] False" in result.stdout, result.stdout


def test_a_real_bash_fills_compreply_from_the_script(tmp_path: Path) -> None:
    if shutil.which("bash") is None:
        pytest.fail("bash is needed")
    script = subprocess.run(
        [str(BASALTCTL), "completion", "bash"], capture_output=True, text=True, check=True
    ).stdout
    (tmp_path / "completion.bash").write_text(script)
    program = (
        f"source {tmp_path / 'completion.bash'}\n"
        "COMP_WORDS=(basaltctl et); COMP_CWORD=1\n"
        "_basaltctl_completion basaltctl\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
        "complete -p basaltctl\n"
    )
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", "--norc", "-c", program], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:1] == ["etcd"]
    assert "_basaltctl_completion" in lines[-1]
