"""export.py owns its folder: built aside and swapped whole (kill -9 at any point leaves the old or the new export),
locked, foreign files refused, never written through a link, a diverged checkpoint or broken logits refused, the
GGUF converter run only from where the user pointed and with a timeout, an upload of exactly the manifest's files.

    python -m pytest tests/test_hardening_export.py -q
Needs the ChatGLM2 tokenizer ($BABYLLAMA_TOKENIZER); a tiny model, --check=false where the check is not the point.
"""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, run_script

import export
from babyllama import output_dir
from babyllama.checkpoint import save_checkpoint
from babyllama.errors import DataError
from model import ModelArgs, Transformer

FAST = ["--check=false"]


def make_ckpt(folder, sha: str, seed: int, edit=None) -> str:
    """best.pt of a tiny random model in trainer.py's format (seed: which model; edit(model): a change to it)."""
    torch.manual_seed(seed)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128)
    model = Transformer(args)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    os.makedirs(folder, exist_ok=True)
    save_checkpoint({"model": model.state_dict(), "model_args": dataclasses.asdict(args), "kind": "sft", "step": seed,
                     "val_loss": 1.5, "best_val_loss": 1.5, "tokenizer_sha256": sha, "config": {}},
                    os.path.join(folder, "best.pt"))
    return str(folder)


def snapshot(folder) -> dict:
    """Every entry of a folder: name -> bytes (a link -> ('link', target), a folder -> its snapshot)."""
    out = {}
    for n in sorted(os.listdir(folder)):
        p = os.path.join(folder, n)
        if os.path.islink(p):
            out[n] = ("link", os.readlink(p))
        else:
            out[n] = snapshot(p) if os.path.isdir(p) else open(p, "rb").read()
    return out


def leftovers(parent) -> list:
    return sorted(n for n in os.listdir(parent) if n.startswith("."))


@pytest.fixture(scope="module")
def tok_sha(tmp_path_factory):
    from chatglm_tokenizer import load_tokenizer
    try:
        return load_tokenizer().sha256
    except (FileNotFoundError, OSError) as e:
        pytest.skip(f"needs the ChatGLM2 tokenizer.model: {e}")


@pytest.fixture(scope="module")
def two_exports(tmp_path_factory, tok_sha):
    """Checkpoints A and B, and what exporting each gives (the reference folders' contents)."""
    base = tmp_path_factory.mktemp("two")
    a, b = make_ckpt(base / "a", tok_sha, 1), make_ckpt(base / "b", tok_sha, 2)
    refs = {}
    for name, ck in (("a", a), ("b", b)):
        ref = base / f"ref_{name}"
        export.main([f"--ckpt={ck}", f"--out_dir={ref}", *FAST])
        refs[name] = {k: v for k, v in snapshot(ref).items() if k != "manifest.json"}
    assert refs["a"]["model.safetensors"] != refs["b"]["model.safetensors"]
    return a, b, refs


def export_killed(ckpt, out, hook: str):
    """export.py in a child that SIGKILLs itself at `hook` (Python run in the child before export.main)."""
    code = ("import os, signal, sys\nsys.path.insert(0, os.getcwd())\nimport export\nfrom babyllama import output_dir\n"
            "die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n" + hook + "\nexport.main(sys.argv[1:])\n")
    return subprocess.run([sys.executable, "-c", code, f"--ckpt={ckpt}", f"--out_dir={out}", *FAST], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def content(folder) -> dict:
    return {k: v for k, v in snapshot(folder).items() if k != "manifest.json"}


KILL_POINTS = {
    # while the new files are written (the tokenizer: after config.json and the weights)
    "writing": "export.write_tokenizer = die",
    # after the new folder is complete (manifest written), before the swap
    "before_swap": "real = output_dir._exchange\noutput_dir._exchange = lambda a, b: die()",
    # right after the one-step swap, before the old folder (now at the .new name) is deleted
    "after_swap": "real = output_dir._exchange\noutput_dir._exchange = lambda a, b: real(a, b) and die()",
}


@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_kill_9_leaves_the_old_or_the_new_export_and_the_next_export_cleans_up(two_exports, tmp_path, point):
    a, b, refs = two_exports
    out = tmp_path / "hf"
    export.main([f"--ckpt={a}", f"--out_dir={out}", *FAST])
    r = export_killed(b, out, KILL_POINTS[point])
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    now = content(out)  # always a whole export, of one model: config, card and weights together
    assert now == (refs["b"] if point == "after_swap" else refs["a"])
    # the unfinished (or the replaced) folder, and the lock file (no longer locked: the kernel freed it)
    assert leftovers(tmp_path) == [".hf.lock", ".hf.new"]
    export.main([f"--ckpt={b}", f"--out_dir={out}", *FAST])  # the next export: cleans up, then writes its own
    assert content(out) == refs["b"] and leftovers(tmp_path) == []


def test_kill_9_between_two_renames_is_finished_by_the_next_export(two_exports, tmp_path):
    """Where RENAME_EXCHANGE is missing the swap is two renames: a kill between them leaves both folders aside;
    the next export puts the complete new one in place first, then replaces it."""
    a, b, refs = two_exports
    out = tmp_path / "hf"
    export.main([f"--ckpt={a}", f"--out_dir={out}", *FAST])
    r = export_killed(b, out, "output_dir._exchange = lambda a, b: False\noutput_dir._between_renames = die")
    assert r.returncode == -signal.SIGKILL and not out.exists()
    assert leftovers(tmp_path) == [".hf.lock", ".hf.new", ".hf.old"]
    output_dir.recover(str(out), str(tmp_path / ".hf.new"), str(tmp_path / ".hf.old"))  # what the next run does first
    assert content(out) == refs["b"] and leftovers(tmp_path) == [".hf.lock"]


def test_a_folder_of_other_files_is_refused_unless_overwrite(two_exports, tmp_path):
    a, _, refs = two_exports
    out = tmp_path / "mine"
    out.mkdir()
    (out / "secrets.env").write_text("HF_TOKEN=hf_precious")
    (out / "notes.md").write_text("my notes")
    r = run_script("export.py", [f"--ckpt={a}", f"--out_dir={out}", *FAST], check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "export.py did not write" in r.stderr and "--overwrite" in r.stderr
    assert snapshot(out) == {"notes.md": b"my notes", "secrets.env": b"HF_TOKEN=hf_precious"}
    assert leftovers(tmp_path) == []
    # a file that is not a folder, a folder holding folders: refused even with --overwrite
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is not a folder"):
        export.export(export.ExportConfig(ckpt=a, out_dir=str(tmp_path / "file"), check=False, overwrite=True))
    export.main([f"--ckpt={a}", f"--out_dir={out}", "--overwrite", *FAST])  # replaced whole: the old files go
    assert content(out) == refs["a"]


def test_a_second_export_into_a_locked_folder_is_refused(two_exports, tmp_path):
    from babyllama.folder_lock import lock_file, unlock
    a, _, _ = two_exports
    out = tmp_path / "hf"
    fd = lock_file(str(tmp_path / ".hf.lock"), "held by the test")  # as an export still running would
    try:
        r = run_script("export.py", [f"--ckpt={a}", f"--out_dir={out}", *FAST], check=False)
        assert r.returncode == 2 and r.stderr.count("\n") == 1
        assert f"another export.py (pid {os.getpid()}) is writing it" in r.stderr and not out.exists()
    finally:
        unlock(fd, str(tmp_path / ".hf.lock"), remove=True)


def test_links_planted_at_every_output_name_are_never_followed(two_exports, tmp_path):
    """A link at each name the export writes (in the folder, and its temp/lock names beside it): the export
    replaces the links, and what they point to stays as it was."""
    a, b, refs = two_exports
    out = tmp_path / "hf"
    export.main([f"--ckpt={a}", f"--out_dir={out}", *FAST])
    victims = tmp_path / "victims"
    victims.mkdir()
    names = sorted(set(os.listdir(out)) - {"manifest.json"})
    assert "model.safetensors" in names
    for n in names + ["Modelfile"]:  # the folder is still export.py's (its manifest lists them), each file a link
        (victims / n).write_text(f"precious {n}")
        if (out / n).exists():
            (out / n).unlink()
        os.symlink(victims / n, out / n)
    json.dump(dict(json.load(open(out / "manifest.json")), files=names + ["Modelfile"]), open(out / "manifest.json", "w"))
    (victims / "dir").mkdir()
    (victims / "dir" / "keep.txt").write_text("precious dir")
    os.symlink(victims / "dir", tmp_path / ".hf.new")  # a link at the new folder's name
    os.symlink(victims / "dir", tmp_path / ".hf.old")
    (victims / "lock").write_text("precious lock")
    os.symlink(victims / "lock", tmp_path / ".hf.lock")
    before = snapshot(victims)
    export.main([f"--ckpt={b}", f"--out_dir={out}", *FAST])
    assert snapshot(victims) == before and before["dir"] == {"keep.txt": b"precious dir"}
    assert content(out) == refs["b"] and not any(os.path.islink(out / n) for n in os.listdir(out))
    assert leftovers(tmp_path) == []
    # a manifest that is a link is not export.py's: the folder needs --overwrite, and what it points to stays
    (victims / "manifest.json").write_text(open(out / "manifest.json").read())
    (out / "manifest.json").unlink()
    os.symlink(victims / "manifest.json", out / "manifest.json")
    before = snapshot(victims)
    with pytest.raises(DataError, match="did not write"):
        export.export(export.ExportConfig(ckpt=b, out_dir=str(out), check=False))
    export.main([f"--ckpt={b}", f"--out_dir={out}", "--overwrite", *FAST])
    assert snapshot(victims) == before and content(out) == refs["b"] and not os.path.islink(out / "manifest.json")
    # out_dir itself a link: refused (the folder is replaced whole, never what a link points to)
    os.symlink(victims / "dir", tmp_path / "linked")
    with pytest.raises(DataError, match="is a symbolic link"):
        export.export(export.ExportConfig(ckpt=a, out_dir=str(tmp_path / "linked"), check=False, overwrite=True))
    assert snapshot(victims / "dir") == {"keep.txt": b"precious dir"}


def test_non_finite_weights_are_refused_before_the_folder_is_touched(tmp_path, tok_sha, two_exports):
    a, _, refs = two_exports
    bad = make_ckpt(tmp_path / "nan", tok_sha, 3, lambda m: m.layers[1].feed_forward.w2.weight.view(-1)[5].fill_(
        float("nan")))
    out = tmp_path / "hf"
    export.main([f"--ckpt={a}", f"--out_dir={out}", *FAST])
    r = run_script("export.py", [f"--ckpt={bad}", f"--out_dir={out}"], check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "weights of layers.1.feed_forward.w2.weight are not finite" in r.stderr and "best.pt" in r.stderr
    assert content(out) == refs["a"] and leftovers(tmp_path) == []


def test_the_logits_check_never_calls_nan_equal(tmp_path, tok_sha, two_exports):
    nan, inf = torch.tensor([[0.0, float("nan")]]), torch.tensor([[float("inf"), 1.0]])
    ok = torch.tensor([[0.0, 1.0]])
    for pairs in ([(ok, nan)], [(nan, ok)], [(ok, ok), (ok, nan)], [(ok, nan), (ok, ok)], [(inf, inf)], [(ok, inf)]):
        assert export.max_abs_diff(pairs) != export.max_abs_diff(pairs)  # NaN, whichever pair holds it
    assert export.max_abs_diff([(ok, ok + 0.5)]) == 0.5
    with pytest.raises(DataError, match="not finite"):
        export.finite_or_stop(float("nan"), "transformers")
    # a finite checkpoint whose float16 export overflows (a norm gain of 1e6): the check stops it, nothing replaced
    a, _, refs = two_exports
    big = make_ckpt(tmp_path / "big", tok_sha, 4, lambda m: m.norm.weight.fill_(1e6))
    out = tmp_path / "hf"
    export.main([f"--ckpt={a}", f"--out_dir={out}", *FAST])
    r = run_script("export.py", [f"--ckpt={big}", f"--out_dir={out}", "--dtype=float16", "--check_tokens=4"],
                   check=False)
    assert r.returncode == 2 and "equal" not in r.stdout and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: check: transformers gives logits that are not finite")
    assert content(out) == refs["a"] and leftovers(tmp_path) == []


FAKE_CONVERTER = """import os, sys, time
out = sys.argv[sys.argv.index("--outfile") + 1]
open(os.environ["MARK"], "a").write(str(os.getpid()) + "\\n")
time.sleep(float(os.environ.get("SLEEP", "0")))
open(out, "wb").write(b"GGUF fake " + sys.argv[sys.argv.index("--outtype") + 1].encode())
"""


def test_converter_only_where_pointed_with_a_timeout(two_exports, tmp_path, monkeypatch):
    a, _, refs = two_exports
    cwd_tool = tmp_path / "cwd" / "llama.cpp"  # the working directory's llama.cpp/ is never run unasked
    cwd_tool.mkdir(parents=True)
    mark = tmp_path / "ran.txt"
    (cwd_tool / "convert_hf_to_gguf.py").write_text(FAKE_CONVERTER)
    env = dict(os.environ, MARK=str(mark), PATH=".:" + os.environ.get("PATH", ""))
    env.pop("LLAMA_CPP_DIR", None)
    out = tmp_path / "hf"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), f"--ckpt={a}", f"--out_dir={out}",
                        "--format=gguf", *FAST], cwd=tmp_path / "cwd", env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "no convert_hf_to_gguf.py: pass --llama_cpp=PATH" in r.stderr
    assert not mark.exists() and not out.exists()
    # pointed at it: runs, and the GGUF files and Modelfile are part of the export (its manifest)
    monkeypatch.setenv("MARK", str(mark))
    export.main([f"--ckpt={a}", f"--out_dir={out}", "--format=gguf", f"--llama_cpp={cwd_tool}", *FAST])
    assert mark.read_text().count("\n") == 2
    manifest = json.load(open(out / "manifest.json"))
    assert {"model-f16.gguf", "model-q8_0.gguf", "Modelfile"} <= set(manifest["files"])
    assert (out / "model-q8_0.gguf").read_bytes() == b"GGUF fake q8_0" and "FROM ./model-q8_0.gguf" in (
        out / "Modelfile").read_text()
    # a converter that hangs is stopped after --convert_timeout, killed, and the old export stays
    before = snapshot(out)
    mark.unlink()
    env = dict(os.environ, MARK=str(mark), SLEEP="60")
    t0 = time.time()
    r = subprocess.run([sys.executable, "export.py", f"--ckpt={a}", f"--out_dir={out}", "--format=gguf",
                        f"--llama_cpp={cwd_tool}", "--convert_timeout=2", *FAST], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "still running after 2 s (--convert_timeout)" in r.stderr and time.time() - t0 < 50
    pid = int(mark.read_text().split()[0])
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    assert snapshot(out) == before and leftovers(tmp_path) == []


class FakeHub:
    """huggingface_hub.HfApi's calls export.py makes, recorded; the repo holds `remote` files."""
    remote: list = []
    commits: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=False, exist_ok=False):
        return repo_id

    def list_repo_files(self, repo_id):
        return list(self.remote)

    def create_commit(self, repo_id, operations, commit_message):
        FakeHub.commits.append([(type(op).__name__, op.path_in_repo) for op in operations])


def test_upload_sends_exactly_the_manifest_files(two_exports, tmp_path, monkeypatch):
    import huggingface_hub
    a, _, _ = two_exports
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.setattr(export, "hub_token", lambda: "hf_fake")
    FakeHub.remote = [".gitattributes", "model-q8_0.gguf", "Modelfile", "notes.md", "model.safetensors"]
    FakeHub.commits = []
    out = tmp_path / "hf"
    real_read = export.read_manifest

    def plant_then_read(folder):  # files that appear in the folder after the export: never sent
        (out / "secrets.env").write_text("HF_TOKEN=hf_precious")
        (out / "model-f16.gguf").write_text("stale")
        (out / ".export-1234").mkdir()
        return real_read(folder)

    monkeypatch.setattr(export, "read_manifest", plant_then_read)
    result = export.main([f"--ckpt={a}", f"--out_dir={out}", "--push_to_hub=me/baby", *FAST])
    assert result["url"] == "https://huggingface.co/me/baby"
    listed = json.load(open(out / "manifest.json"))["files"]
    (ops,) = FakeHub.commits
    assert sorted(p for kind, p in ops if kind == "CommitOperationAdd") == sorted(listed)
    assert "manifest.json" not in listed and "secrets.env" not in listed
    # the repo's GGUF files and Modelfile of an earlier upload would mix two models: removed; notes.md stays
    assert sorted(p for kind, p in ops if kind == "CommitOperationDelete") == ["Modelfile", "model-q8_0.gguf"]
    # a link among the files is never uploaded (it would send what it points to)
    os.symlink(out / "secrets.env", tmp_path / "link")
    (tmp_path / "plain").write_text("x")
    from babyllama.hub import upload_files
    for bad in ("link", "../plain", ".hidden"):
        with pytest.raises(DataError, match="not a plain file of the export"):
            upload_files(str(tmp_path), [bad], "me/baby", False, "hf_fake")
