#!/usr/bin/env python3
"""Render the command line's argument parsers as a man page or a bash
completion script, so that neither can fall behind the code.

    python3 scripts/cli_docs.py man  > vhost-user-balloon.1
    python3 scripts/cli_docs.py bash > vhost-user-balloon    (bash-completion)

Uses the checkout's balloon_device (no C extension needed).  The man page's
date is SOURCE_DATE_EPOCH when set (reproducible builds), else today.
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from balloon_device.host import cli  # noqa: E402
from balloon_device.host.version import version  # noqa: E402

PROG = "vhost-user-balloon"
# Options whose value is a path: complete file names.
PATH_OPTIONS = {"--socket-path", "--control-socket", "--hugepages", "--socket-dir",
                "--policy-cgroup", "--binary"}


def parsers():
    """[(words after the program name, parser)]: the daemon, then each subcommand."""
    out = [((), cli._daemon_parser())]
    for name, (_, factory, _) in cli.SUBCOMMANDS.items():
        out.append(((name,), factory()))
    return out


def sub_actions(parser):
    return [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]


def options(parser):
    """[(group title, [action])] of the optional arguments that are shown."""
    groups = []
    for g in parser._action_groups:
        acts = [a for a in g._group_actions if a.option_strings and a.help != argparse.SUPPRESS]
        if acts:
            groups.append((g.title, acts))
    return groups


def positionals(parser):
    return [a for a in parser._actions if not a.option_strings
            and not isinstance(a, argparse._SubParsersAction) and a.help != argparse.SUPPRESS]


def takes_value(action):
    return action.nargs != 0


def metavar(action):
    if action.metavar:
        return action.metavar
    if action.choices:
        return "{" + ",".join(map(str, action.choices)) + "}"
    return action.dest.upper()


# ---- man page ---------------------------------------------------------------

def roff(text):
    text = str(text).replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + ln if ln[:1] in (".", "'") else ln) for ln in text.splitlines())


def help_text(action):
    text = action.help or ""
    if "%(" in text:
        text = text % {"default": action.default, "prog": PROG}
    return text


def man_options(parser, out):
    for title, acts in options(parser):
        if title not in ("options", "optional arguments"):
            out.append(f".SS {roff(title.capitalize())}")
        for a in acts:
            names = ", ".join(f"\\fB{roff(o)}\\fR" for o in a.option_strings)
            if takes_value(a):
                mv = metavar(a)
                mv = f"[\\fI{roff(mv)}\\fR]" if a.nargs == "?" else f"\\fI{roff(mv)}\\fR"
                names += " " + mv
            out += [".TP", names, roff(help_text(a))]


def man_positionals(parser, out):
    for a in positionals(parser):
        out += [".TP", f"\\fI{roff(metavar(a))}\\fR", roff(help_text(a))]


def man_page():
    date = time.strftime("%Y-%m-%d", time.gmtime(int(os.environ.get("SOURCE_DATE_EPOCH",
                                                                     time.time()))))
    daemon = cli._daemon_parser()
    out = [f'.TH VHOST\\-USER\\-BALLOON 1 "{date}" "{PROG} {roff(version())}" "User Commands"',
           ".SH NAME", f"{roff(PROG)} \\- vhost\\-user virtio\\-balloon backend with free page "
                       "reporting",
           ".SH SYNOPSIS",
           f".B {roff(PROG)}", "\\fB\\-\\-socket\\-path\\fR \\fIPATH\\fR [\\fIoptions\\fR]",
           ".br", f".B {roff(PROG)}",
           "\\fB\\-\\-guest\\fR \\fINAME\\fR=\\fIPATH\\fR ... [\\fIoptions\\fR]"]
    for name in cli.SUBCOMMANDS:
        out += [".br", f".B {roff(PROG)} {roff(name)}", "[\\fIoptions\\fR]"]
    out += [".SH DESCRIPTION", roff(daemon.description),
            "QEMU (10.2 or later) attaches to it through its generic vhost\\-user device; "
            f"\\fB{roff(PROG)} qemu\\-args\\fR prints the arguments.",
            ".SH OPTIONS"]
    man_options(daemon, out)
    out.append(".SH SUBCOMMANDS")
    for name, (summary, factory, _) in cli.SUBCOMMANDS.items():
        p = factory()
        out += [f".SS {roff(PROG)} {roff(name)}", roff(p.description or summary)]
        man_positionals(p, out)
        man_options(p, out)
        for sa in sub_actions(p):
            for choice in sa._choices_actions:
                sp = sa.choices[choice.dest]
                args = " ".join(f"\\fI{roff(metavar(a))}\\fR" for a in positionals(sp))
                out += [".TP", f"\\fB{roff(choice.dest)}\\fR {args}".rstrip(),
                        roff(choice.help or "")]
                for a in positionals(sp) + [a for _, acts in options(sp) for a in acts
                                            if a.dest not in ("help", "guest")]:
                    name_ = ", ".join(a.option_strings) or metavar(a)
                    out += [".RS", ".TP", f"\\fB{roff(name_)}\\fR", roff(help_text(a)), ".RE"]
        if p.epilog:
            out += [".PP", roff(p.epilog)]
    out += [".SH EXIT STATUS",
            "The daemon exits 0 when stopped (SIGTERM, SIGINT, or its frontend left without "
            "\\fB\\-\\-keep\\-listening\\fR) and 2 on a configuration error. \\fBctl\\fR exits "
            "0 when the daemon did what was asked, 1 when it refused (the reply says why) and "
            "2 on a usage error or when it cannot reach the daemon.",
            ".SH FILES",
            ".TP", "/usr/share/qemu/vhost\\-user/50\\-vhost\\-user\\-balloon.json",
            "the backend description QEMU management tools read",
            ".TP", "/etc/default/vhost\\-user\\-balloon",
            "the guests of vhost\\-user\\-balloon.service",
            ".SH SEE ALSO", "\\fBqemu\\-system\\-x86_64\\fR(1), \\fBsystemd.service\\fR(5); "
            "/usr/share/doc/vhost\\-user\\-balloon/ (operations.md, configuration.md, "
            "troubleshooting.md)"]
    return "\n".join(out) + "\n"


# ---- bash completion ----------------------------------------------------------

def _words(parser):
    words = [o for _, acts in options(parser) for a in acts for o in a.option_strings]
    for a in positionals(parser):
        if a.choices:
            words += list(a.choices)
    for sa in sub_actions(parser):
        words += list(sa.choices)
    return words


def bash_completion():
    contexts = {}      # context ("" / "ctl" / "ctl target") -> words
    values = {}        # option -> "files" or "choices ..." or "" (free text)
    subs = {}          # context -> its subcommand names

    def visit(ctx, parser):
        contexts[ctx] = _words(parser)
        for _, acts in options(parser):
            for a in acts:
                if not takes_value(a):
                    continue
                for o in a.option_strings:
                    if o in PATH_OPTIONS:
                        values[o] = "files"
                    elif a.choices:
                        values[o] = "choices " + " ".join(map(str, a.choices))
                    else:
                        values.setdefault(o, "")
        for sa in sub_actions(parser):
            subs[ctx] = list(sa.choices)
            for name, sp in sa.choices.items():
                visit(f"{ctx} {name}".strip(), sp)

    for words, p in parsers():
        visit(" ".join(words), p)
    subs[""] = list(cli.SUBCOMMANDS)
    contexts[""] += list(cli.SUBCOMMANDS)

    out = [f"# bash completion for {PROG} {version()}",
           "# Generated from the argument parsers by scripts/cli_docs.py; do not edit.",
           "_vhost_user_balloon() {",
           '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"',
           '    local ctx="" i w',
           "    for ((i = 1; i < COMP_CWORD; i++)); do",
           '        w="${COMP_WORDS[i]}"',
           '        case "$ctx/$w" in']
    for ctx, names in subs.items():
        pats = "|".join(f'"{ctx}/{n}"' for n in names)
        new = f"{ctx} $w" if ctx else "$w"
        out.append(f'            {pats}) ctx="{new}" ;;')
    out += ["        esac", "    done",
            '    case "$prev" in']
    files = sorted(o for o, v in values.items() if v == "files")
    out.append(f'        {"|".join(files)}) COMPREPLY=($(compgen -f -- "$cur")); return ;;')
    for o, v in sorted(values.items()):
        if v.startswith("choices "):
            out.append(f'        {o}) COMPREPLY=($(compgen -W "{v[8:]}" -- "$cur")); return ;;')
    free = sorted(o for o, v in values.items() if v == "")
    out.append(f'        {"|".join(free)}) return ;;')
    out += ["    esac", '    local words=""', '    case "$ctx" in']
    for ctx, words in contexts.items():
        out.append(f'        "{ctx}") words="{" ".join(words)}" ;;')
    out += ["    esac", '    COMPREPLY=($(compgen -W "$words" -- "$cur"))', "}",
            f"complete -F _vhost_user_balloon {PROG}"]
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("man", "bash"))
    ns = p.parse_args(argv)
    sys.stdout.write(man_page() if ns.what == "man" else bash_completion())
    return 0


if __name__ == "__main__":
    sys.exit(main())
