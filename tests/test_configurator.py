"""--help / -h on every script: the docstring's commands, then every config field with its type, default and the
comment that follows it in the source (inherited fields included), exit 0, whatever other flags stand around it."""
import dataclasses
import inspect
import re
import shlex
import textwrap

import pytest

import bench
import chat
import data_process
import eval as ev
import pretrain
import sft
from babyllama.config import parse_config
from conftest import ROOT, run_script

SCRIPTS = [("pretrain.py", pretrain.PretrainConfig), ("sft.py", sft.SFTConfig), ("eval.py", ev.EvalConfig),
           ("chat.py", chat.ChatConfig), ("data_process.py", data_process.Config), ("bench.py", bench.BenchConfig)]
# one help line: "  --name=default  type  meaning" (default shell-quoted, meaning possibly empty)
LINE = re.compile(r"^  --(?P<name>\w+)=(?P<default>'[^']*'|\S*) +(?P<type>\S+)(?: +(?P<meaning>.*))?$")


def source_comment(cls, name: str) -> str:
    """The field's trailing `# comment`, read with a plain regex over the class sources, most derived class first
    (an override without a comment keeps its base's): an extractor independent of the one under test."""
    for klass in cls.__mro__:
        if not dataclasses.is_dataclass(klass):
            continue
        m = re.search(rf"^    {name}: [^\n]*?  # (.*)$", inspect.getsource(klass), re.M)
        if m:
            return m.group(1).strip()
    return ""


def help_rows(stdout: str) -> dict:
    rows = {}
    for line in stdout.splitlines():
        m = LINE.match(line)
        if m:
            rows[m["name"]] = m
    return rows


def check_help(cls, stdout: str) -> None:
    module_doc = inspect.getmodule(cls).__doc__.strip()
    assert stdout.startswith(module_doc.splitlines()[0])
    assert module_doc in stdout
    rows = help_rows(stdout)
    assert list(rows) == [f.name for f in dataclasses.fields(cls)]  # every field, in declaration order, nothing else
    for f in dataclasses.fields(cls):
        row = rows[f.name]
        assert row["type"] == f.type, f.name
        assert (row["meaning"] or "") == source_comment(cls, f.name), f.name
        # the default is shown as it is typed: giving it back on the command line yields the field's default
        typed = parse_config(cls, [f"--{f.name}={shlex.split(row['default'])[0] if row['default'] else ''}"])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert getattr(typed, f.name) == default, f.name


@pytest.mark.parametrize("script,cls", SCRIPTS, ids=[s for s, _ in SCRIPTS])
def test_help_lists_every_flag(script, cls):
    r = run_script(script, ["--help"], timeout=120)
    assert r.returncode == 0
    check_help(cls, r.stdout)
    # -h is the same, also after other (even bad) flags and after data_process's mode word
    before = ["pretrain", "--num_workers=1"] if script == "data_process.py" else ["--device=cpu", "--no_such_flag=1"]
    r2 = run_script(script, [*before, "-h"], timeout=120)
    assert r2.returncode == 0 and r2.stdout == r.stdout
    if script == "data_process.py":  # a leading -h is a flag, not a mode word
        assert run_script(script, ["-h"]).stdout == r.stdout


def test_help_shows_inherited_comments():
    out = run_script("sft.py", ["-h"], timeout=120).stdout
    rows = help_rows(out)
    # SFTConfig overrides min_lr without a comment: the meaning comes from TrainConfig's field
    assert "min_lr" in vars(sft.SFTConfig)["__annotations__"]
    assert rows["min_lr"]["meaning"] == "LR at the end of the decay" and rows["min_lr"]["default"] == repr(sft.SFTConfig.min_lr)
    # inherited without override; and an override with its own comment wins over the base's
    assert rows["grad_clip"]["meaning"] == "clip the global grad norm; 0 = off"
    assert rows["out_dir"]["meaning"].startswith("where this run's checkpoints go") and rows["out_dir"]["default"] == "out/sft"


def test_help_of_a_new_config(tmp_path, monkeypatch):
    """A script with fields added without comments, a field over several lines and a list default."""
    script = tmp_path / "toy.py"
    script.write_text(textwrap.dedent('''\
        """Toy script.

            python toy.py --steps=3
        """
        from dataclasses import dataclass, field
        from typing import List

        from babyllama.config import config_or_exit


        @dataclass
        class Base:
            steps: int = 10  # how many steps
            name: str = "a b"  # a value with a space
            rate: float = 0.5


        @dataclass
        class Toy(Base):
            steps: int = 3
            fresh: bool = False
            tags: List[str] = field(
                default_factory=lambda: ["x", "y"])  # comma-separated tags


        if __name__ == "__main__":
            print(config_or_exit(Toy))
        '''))
    monkeypatch.setenv("PYTHONPATH", ROOT)
    r = run_script(str(script), ["--steps=4", "--help", "--fresh"])
    assert r.returncode == 0
    assert r.stdout.startswith("Toy script.\n\n    python toy.py --steps=3\n")
    rows = help_rows(r.stdout)
    assert {n: (m["default"], m["type"], m["meaning"]) for n, m in rows.items()} == {
        "steps": ("3", "int", "how many steps"), "name": ("'a b'", "str", "a value with a space"),
        "rate": ("0.5", "float", None), "fresh": ("false", "bool", None), "tags": ("x,y", "List[str]", "comma-separated tags")}
    assert [line.split() for line in r.stdout.splitlines() if "--rate=" in line] == [["--rate=0.5", "float"]]
    # without --help the flags still parse as before
    assert "Toy(steps=4, name='a b', rate=0.5, fresh=True, tags=['x', 'y'])" in run_script(str(script), ["--steps=4", "--fresh"]).stdout
