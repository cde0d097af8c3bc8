"""--help / -h on every script: the docstring's commands, then every config field with its type, default and the
comment that follows it in the source (inherited fields included), exit 0, whatever other flags stand around it."""
import os
import runpy
import sys
import textwrap

import pytest

import bench
import chat
import data_process
import eval as ev
import pretrain
import sft
from conftest import ROOT, check_help, help_rows, run_script

SCRIPTS = [("pretrain.py", pretrain.PretrainConfig), ("sft.py", sft.SFTConfig), ("eval.py", ev.EvalConfig),
           ("chat.py", chat.ChatConfig), ("data_process.py", data_process.Config), ("bench.py", bench.BenchConfig)]


def script_help(script: str, argv: list, capsys, monkeypatch) -> str:
    """`python script argv` run in this process (runpy, as __main__: no new interpreter) -> stdout; it must exit 0."""
    monkeypatch.setattr(sys, "argv", [script, *argv])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    assert e.value.code in (0, None)
    return capsys.readouterr().out


@pytest.mark.parametrize("script,cls", SCRIPTS, ids=[s for s, _ in SCRIPTS])
def test_help_lists_every_flag(script, cls, capsys, monkeypatch):
    out = script_help(script, ["--help"], capsys, monkeypatch)  # each script is also launched as a process elsewhere
    check_help(cls, out)
    # -h is the same, also after other (even bad) flags and after data_process's mode word
    before = ["pretrain", "--num_workers=1"] if script == "data_process.py" else ["--device=cpu", "--no_such_flag=1"]
    assert script_help(script, [*before, "-h"], capsys, monkeypatch) == out
    if script == "data_process.py":  # a leading -h is a flag, not a mode word
        assert script_help(script, ["-h"], capsys, monkeypatch) == out


@pytest.mark.slow
def test_help_of_a_launched_script_is_the_same():
    """`python pretrain.py --help` as a user runs it: exit 0, the same text as the in-process runs above."""
    r = run_script("pretrain.py", ["--help"], timeout=120)
    assert r.returncode == 0
    check_help(pretrain.PretrainConfig, r.stdout)


def test_help_shows_inherited_comments(capsys, monkeypatch):
    out = script_help("sft.py", ["-h"], capsys, monkeypatch)
    rows = help_rows(out)
    # SFTConfig overrides min_lr without a comment: the meaning comes from TrainConfig's field
    assert "min_lr" in vars(sft.SFTConfig)["__annotations__"]
    assert rows["min_lr"]["meaning"] == "LR at the end of the decay" and rows["min_lr"]["default"] == repr(sft.SFTConfig.min_lr)
    # inherited without override; and an override with its own comment wins over the base's
    assert rows["grad_clip"]["meaning"] == "clip the global grad norm; 0 = off"
    assert rows["out_dir"]["meaning"].startswith("where this run's checkpoints go") and rows["out_dir"]["default"] == "out/sft"


@pytest.mark.slow
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
