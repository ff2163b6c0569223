"""``basaltctl completion bash|zsh|fish``: the shell completion script, and the answers
to it.

The script calls ``basaltctl`` back with ``_BASALTCTL_COMPLETE=<shell>_complete`` (the
order of ``click``; typer's ``complete_<shell>`` is accepted too), the words typed so
far in ``COMP_WORDS`` and the index of the one being completed in ``COMP_CWORD``.
:func:`complete` answers one completion per line (zsh: value and help on two lines;
fish: value TAB help) from the same click commands ``basaltctl`` runs, so verbs, groups,
options and choices stay in step with the code. Start-up stays cheap: completing the
verb itself imports no verb module (the names come from the tables of
:mod:`basalt.cli.main`), and completing below a verb imports only that verb's module.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from typer._click.core import Command

PROG = "basaltctl"
COMPLETE_VAR = "_BASALTCTL_COMPLETE"
SHELLS = ("bash", "zsh", "fish")

_BASH = """\
# basaltctl completion for bash: add to ~/.bashrc
#   source <(basaltctl completion bash)
_basaltctl_completion() {
    local IFS=$'\\n'
    local line kind value
    COMPREPLY=()
    for line in $(env COMP_WORDS="${COMP_WORDS[*]}" COMP_CWORD="$COMP_CWORD" \\
                  _BASALTCTL_COMPLETE=bash_complete "$1" 2>/dev/null); do
        kind=${line%%,*}
        value=${line#*,}
        case $kind in
            file) compopt -o default 2>/dev/null ;;
            dir) compopt -o dirnames 2>/dev/null ;;
            *) COMPREPLY+=("$value") ;;
        esac
    done
    return 0
}
complete -o nosort -F _basaltctl_completion basaltctl
"""

_ZSH = """\
#compdef basaltctl
# basaltctl completion for zsh: add to ~/.zshrc (after compinit)
#   source <(basaltctl completion zsh)
_basaltctl_completion() {
    local -a response described plain
    local kind value help
    response=("${(@f)$(env COMP_WORDS="${words[*]}" COMP_CWORD=$((CURRENT - 1)) \\
        _BASALTCTL_COMPLETE=zsh_complete basaltctl 2>/dev/null)}")
    for kind value help in "${response[@]}"; do
        case $kind in
            file) _files; return ;;
            dir) _path_files -/; return ;;
            *) if [[ -n $help && $help != _ ]]; then
                   described+=("${value//:/\\\\:}:$help")
               else
                   plain+=("$value")
               fi ;;
        esac
    done
    (( ${#described} )) && _describe -V basaltctl described
    (( ${#plain} )) && compadd -U -V unsorted -- "${plain[@]}"
    return 0
}
if [[ $zsh_eval_context[-1] == loadautofunc ]]; then
    _basaltctl_completion "$@"
else
    compdef _basaltctl_completion basaltctl
fi
"""

_FISH = """\
# basaltctl completion for fish: save as ~/.config/fish/completions/basaltctl.fish
#   basaltctl completion fish > ~/.config/fish/completions/basaltctl.fish
function __basaltctl_complete
    set -l words (commandline -opc)
    set -l current (commandline -ct)
    env COMP_WORDS="$words $current" COMP_CWORD=(count $words) \\
        _BASALTCTL_COMPLETE=fish_complete basaltctl 2>/dev/null
end
complete --command basaltctl --no-files --arguments "(__basaltctl_complete)"
"""

SCRIPTS = {"bash": _BASH, "zsh": _ZSH, "fish": _FISH}


def completion(
    shell: Annotated[str, typer.Argument(help="bash, zsh or fish.", show_default=False)],
) -> None:
    """Print the shell completion script for SHELL (see its first lines for where it goes)."""
    from basalt.machinery.errors import BasaltError

    if shell not in SCRIPTS:
        raise BasaltError(
            f"no completion for shell {shell!r}",
            hint=f"choose one of {', '.join(SHELLS)}, e.g. 'source <(basaltctl completion bash)'",
        )
    sys.stdout.write(SCRIPTS[shell])


def _shell(instruction: str) -> str | None:
    """The shell of ``bash_complete`` (click's order) or ``complete_bash`` (typer's)."""
    first, _, second = instruction.partition("_")
    for shell, verb in ((first, second), (second, first)):
        if shell in SHELLS and verb == "complete":
            return shell
    return None


def words(environ: dict[str, str] | os._Environ[str]) -> tuple[list[str], str]:
    """(the words before the one completed, without the program; the one completed)."""
    from typer._click.shell_completion import split_arg_string

    line = environ.get("COMP_WORDS", "")
    typed = split_arg_string(line)
    try:
        index = int(environ.get("COMP_CWORD", ""))
    except ValueError:
        index = len(typed) if line.endswith(" ") or not typed else len(typed) - 1
    return typed[1:index], typed[index] if index < len(typed) else ""


@dataclass(frozen=True)
class Verbs:
    """What :mod:`basalt.cli.main` knows (handed over: main imports this module): every
    verb's name, the app with one verb (or none: ``\0``), the verb among typed words."""

    names: Collection[str]
    build: Callable[[str | None], typer.Typer]
    verb_of: Callable[[list[str]], str | None]


def _command(verbs: Verbs, args: list[str]) -> Command:
    """The click command to complete against: the verb's own when one is typed; else the
    root with its global options and every verb as a bare name (no module imported)."""
    from typer.core import TyperCommand, TyperGroup
    from typer.main import get_command

    verb = verbs.verb_of(args)
    command = get_command(verbs.build(verb or "\0"))
    if verb is None and isinstance(command, TyperGroup):
        for name in sorted(verbs.names):
            command.add_command(TyperCommand(name), name)
    return command


def completions(verbs: Verbs, args: list[str], incomplete: str) -> list[tuple[str, str, str]]:
    """(type, value, help) of every completion of ``incomplete`` after ``args``."""
    from typer._click.shell_completion import CompletionItem, ShellComplete

    class Answer(ShellComplete):
        name = "basaltctl"
        source_template = ""

        def source_vars(self) -> dict[str, Any]:
            return {}

        def get_completion_args(self) -> tuple[list[str], str]:
            return args, incomplete

        def format_completion(self, item: CompletionItem) -> str:
            return item.value  # type: ignore[no-any-return]

    found: list[Any] = Answer(_command(verbs, args), {}, PROG, COMPLETE_VAR).get_completions(
        args, incomplete
    )
    return [(item.type, str(item.value), item.help or "") for item in found]


def complete(instruction: str, verbs: Verbs) -> int:
    """Answer one completion request (``_BASALTCTL_COMPLETE`` set); the exit code."""
    shell = _shell(instruction)
    if shell is None:
        print(
            f"error: {COMPLETE_VAR}={instruction!r} is not a completion request\n"
            f"  hint: one of {', '.join(s + '_complete' for s in SHELLS)}",
            file=sys.stderr,
        )
        return 1
    args, incomplete = words(os.environ)
    lines = []
    for kind, value, help_text in completions(verbs, args, incomplete):
        one_line = " ".join(help_text.split())
        if shell == "bash":
            lines.append(f"{kind},{value}")
        elif shell == "zsh":
            lines += [kind, value, one_line or "_"]
        else:
            lines.append(f"{value}\t{one_line}" if one_line else value)
    if lines:
        print("\n".join(lines))
    return 0
