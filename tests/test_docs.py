"""The commands the README and the docs show stay true: every `ccfs ...`, `launch/ccfs.py` and `launch/scores.py`
command in their code blocks parses with the real parser, names config files that exist, and sets config keys
that exist with valid values. (Running them is what the whole-run tests and CI's README command do.)"""
import os
import re
import shlex

import pytest

from ccfs_dist import cli
from ccfs_dist.config import load_config
from ccfs_dist.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", "RESULTS.md", "scores/README.md",
         *sorted("docs/" + n for n in os.listdir(os.path.join(ROOT, "docs")) if n.endswith(".md"))]
SCRIPTS = {"launch/ccfs.py": "run", "launch/scores.py": "scores", "launch/ablate.py": "ablate"}


def code_lines(page):
    """Lines of the page's fenced code blocks, continuation lines joined, comments cut."""
    text = open(os.path.join(ROOT, page), encoding="utf-8").read()
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                yield line


def engine_command(line):
    """The `ccfs` argv of a shown command (`ccfs run ...`, `[accelerate launch ...] launch/ccfs.py ...`),
    or None for any other command. Parts joined by `&&`, `|`, `;` or `&` are separate commands."""
    for part in re.split(r"&&|\||;|&", line):
        try:
            words = shlex.split(part)
        except ValueError:
            continue
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):        # VAR=value prefixes
            words = words[1:]
        if words[:1] == ["ccfs"] and len(words) > 1:
            yield words[1:]
        for script, sub in SCRIPTS.items():
            if script in words:
                yield [sub] + words[words.index(script) + 1:]


def shown_commands():
    found = []
    for page in PAGES:
        for line in code_lines(page):
            for argv in engine_command(line):
                if "..." in argv or any("<" in w for w in argv):          # a placeholder to fill in
                    continue
                found.append(pytest.param(argv, id=f"{page}: {' '.join(argv)[:60]}"))
    return found


COMMANDS = shown_commands()


def test_the_pages_show_commands_of_every_kind():
    kinds = {c.values[0][0] for c in COMMANDS}
    assert {"run", "scores", "shards", "report", "ablate"} <= kinds, kinds


def parse(argv):
    if argv[0] == "ablate":                       # launch/ablate.py's own parser, loaded by path
        import importlib.util
        spec = importlib.util.spec_from_file_location("ablate_doc", os.path.join(ROOT, "launch", "ablate.py"))
        ablate = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ablate)
        return ablate.parse_args(argv[1:])
    return cli.build_parser().parse_args(argv)


@pytest.mark.parametrize("argv", COMMANDS)
def test_shown_command_parses_and_its_config_loads(argv):
    try:
        args = parse(argv)
    except SystemExit as exc:
        if argv[-1] in ("--help", "-h") and exc.code == 0:
            return
        pytest.fail(f"`ccfs {' '.join(argv)}` does not parse")
    config = getattr(args, "config", None)
    if config is None or getattr(args, "overrides", None) is None:
        return
    path = config if os.path.isabs(config) else os.path.join(ROOT, config)
    assert os.path.isfile(path), f"`ccfs {' '.join(argv)}`: config {config} does not exist"
    try:
        cfg = load_config(path, args.overrides)
    except ConfigError as exc:
        pytest.fail(f"`ccfs {' '.join(argv)}`: {exc}")
    if argv[0] == "scores" and args.out is None and not args.overwrite:
        # the default --out; a fresh clone ships some score files, which `ccfs scores` will not replace unasked
        methods = (args.method or cfg["scores"]["method"]).split(",")
        shipped = [m for m in methods if os.path.exists(os.path.join(ROOT, "scores", f"{cfg['data']['source']}_{m}.npy"))]
        assert not shipped, f"`ccfs {' '.join(argv)}` fails on a fresh clone: scores/ ships its output; add --overwrite"
