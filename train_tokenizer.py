"""Train a tokenizer of our own: a SentencePiece BPE model on the corpora data_process.py reads.

  python train_tokenizer.py --vocab_size=4096   # the embedded sample data/sample/pretrain/* -> data/tokenizer
  python train_tokenizer.py --inputs=wiki.json.gz,baike.jsonl --vocab_size=16384 --out_dir=data/tok16k
  python train_tokenizer.py --manifest=corpora.txt --vocab_size=32768 --max_chars=200000000 --out_dir=data/tok32k
  python train_tokenizer.py --inputs=hf://datasets/pleisto/wikipedia-cn-20230720-filtered/wikipedia-cn-20230720-filtered.json
then tokenize and train with it (every script's --tokenizer takes the folder or the file in it):
  python data_process.py pretrain --inputs=wiki.json.gz --tokenizer=data/tok16k --out_dir=data/pretrain16k
  python pretrain.py --data_dir=data/pretrain16k --tokenizer=data/tok16k   # the model's vocab: the tokenizer's

Inputs are read exactly as data_process.py reads them (babyllama/corpora.py: every format, gzip, manifests, `path:format`,
hf://), streamed, one document at a time, taking documents from the inputs in turn so each contributes until the
character budget (--max_chars) is spent: memory holds the budget's text, never a whole corpus. Documents are cut into
lines (a line longer than --max_sentence_chars into pieces), since SentencePiece trains on sentences.

The model (what the rest of the project expects of a tokenizer.model):
  BPE; <unk>=0 (also the pad id, as in ChatGLM2: no separate pad piece), <s>=1, </s>=2; byte fallback (a character the
  vocabulary lacks becomes its UTF-8 bytes, so decode(encode(text)) == text and <unk> never appears; only
  SentencePiece's space mark "▁" (U+2581) in a text comes back as a space, as with ChatGLM2); digits split one per
  token; whitespace kept as it is (no normalization, no dummy prefix, no merging of spaces); at most 65,535 pieces, so
  every id fits the uint16 shards; every id is a piece (the model's vocab_size is the piece count).

Output (out_dir): tokenizer.model and tokenizer_meta.json (format baby-llama2-chinese/tokenizer-v1: sha256 of
tokenizer.model, vocab size, special ids, settings, sources with documents and characters read from each), with a
manifest.json. The folder is locked while the tokenizer trains, built beside out_dir and swapped in whole at the end
(babyllama/output_dir.py): a kill leaves the old tokenizer or the new one, never one file of each. A folder holding
files train_tokenizer.py did not write, or another tokenizer, is replaced only with --overwrite (the data and runs
made with a tokenizer need that very tokenizer). A bad input (unknown format, empty input, a vocabulary larger than
the text supports) is a one-line error (exit 2) and writes nothing.
"""
from __future__ import annotations

import hashlib
import io
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Optional

from chatglm_tokenizer import MODEL_FILE
from babyllama.errors import ctrl_c, first_line, user_errors
from babyllama.config import config_dict, config_or_exit
from babyllama.errors import DataError, check
from babyllama.corpora import ReadOptions, Reporter, Source, detect, iter_documents, parse_inputs
from babyllama.fileio import write_atomic, write_json
from babyllama.output_dir import OutputFolder

TOKENIZER_FORMAT = "baby-llama2-chinese/tokenizer-v1"
META_FILE = "tokenizer_meta.json"
MAX_VOCAB = 65535  # ids 0..65534 fit uint16
SPECIAL_IDS = {"unk": 0, "bos": 1, "eos": 2, "pad": 0}  # pad = unk, as the ChatGLM2 tokenizer does


@dataclass
class Config(ReadOptions):  # + txt_max_chars, max_record_chars (corpora.ReadOptions)
    inputs: list[str] = field(default_factory=list)  # comma-separated files (path[:format], hf://...); empty = data/sample/pretrain/*
    manifest: str = ""  # text file, one input per line: "path" or "path format" ('#' starts a comment)
    out_dir: str = "data/tokenizer"  # gets tokenizer.model and tokenizer_meta.json
    vocab_size: int = 16384  # pieces, specials and the 256 byte pieces included; at most 65,535 (uint16 ids)
    max_chars: int = 100_000_000  # character budget: training stops reading input after this many (bounds memory)
    max_sentence_chars: int = 1024  # a line longer than this is cut into pieces of this many characters
    min_chars: int = 10  # drop documents with fewer characters (after stripping), as data_process.py does
    character_coverage: float = 0.9995  # share of the text's characters that get pieces; rarer ones fall back to bytes
    num_threads: int = 0  # SentencePiece trainer threads; 0 = one per CPU core
    max_reports: int = 5  # bad records reported individually (file:line); all are counted
    progress: bool = True  # a line per 10% of the budget (or per 10M characters) while reading
    verbose: bool = False  # SentencePiece's own log (every merge) on stderr
    overwrite: bool = False  # replace an out_dir holding a tokenizer (or files this script did not write)

    def validate(self):
        check(not (self.inputs and self.manifest), "give --inputs or --manifest, not both")
        check(300 <= self.vocab_size <= MAX_VOCAB,
              f"--vocab_size must be in 300..{MAX_VOCAB} (3 specials + 256 byte pieces + merges; ids fit uint16)")
        check(self.max_chars >= 1, f"--max_chars must be >= 1, got {self.max_chars}")
        check(16 <= self.max_sentence_chars <= 16384, f"--max_sentence_chars must be in 16..16384, got {self.max_sentence_chars}")
        check(self.min_chars >= 0, f"--min_chars must be >= 0, got {self.min_chars}")
        check(self.txt_max_chars >= 1, f"--txt_max_chars must be >= 1, got {self.txt_max_chars}")
        check(0.9 <= self.character_coverage <= 1.0, f"--character_coverage must be in [0.9, 1], got {self.character_coverage}")
        check(self.num_threads >= 0, f"--num_threads must be >= 0, got {self.num_threads}")
        check(self.max_record_chars >= 1024, f"--max_record_chars must be >= 1024, got {self.max_record_chars}")


def split_sentences(text: str, max_chars: int) -> Iterator[str]:
    """A document -> its non-empty lines, each cut into pieces of at most max_chars characters (SentencePiece skips
    sentences over its max_sentence_length bytes; a character is at most 4 UTF-8 bytes)."""
    for line in text.split("\n"):
        for i in range(0, len(line), max_chars):
            piece = line[i:i + max_chars]
            if piece.strip():
                yield piece


def interleave_documents(sources: list[Source], cfg: Config, rep: Reporter, stats: dict) -> Iterator[str]:
    """Documents of all sources in turn (one from each, round robin) until max_chars characters are taken; stats[path]
    counts the documents and characters taken from each source."""
    streams = [(src, iter_documents(src, cfg, rep)) for src in sources]
    taken = 0
    while streams and taken < cfg.max_chars:
        alive = []
        for src, docs in streams:
            for text in docs:  # the next document of this source long enough to keep
                if len(text.strip()) >= cfg.min_chars:
                    break
                stats[src.path]["too_short"] += 1
            else:
                continue  # this source is exhausted
            text = text[:cfg.max_chars - taken]
            stats[src.path]["documents"] += 1
            stats[src.path]["chars"] += len(text)
            taken += len(text)
            yield text
            alive.append((src, docs))
            if taken >= cfg.max_chars:
                break
        streams = alive


def read_sentences(sources: list[Source], cfg: Config, rep: Reporter, stats: dict) -> list[str]:
    """The training text, as sentences, within the character budget; prints progress."""
    sentences, chars, next_report = [], 0, 0
    step = min(cfg.max_chars // 10 or 1, 10_000_000)
    t0 = time.perf_counter()
    for text in interleave_documents(sources, cfg, rep, stats):
        sentences.extend(split_sentences(text, cfg.max_sentence_chars))
        chars += len(text)
        if cfg.progress and chars >= next_report:
            print(f"read {chars:,} / {cfg.max_chars:,} characters ({100 * chars / cfg.max_chars:.0f}%), "
                  f"{len(sentences):,} sentences, {time.perf_counter() - t0:.1f}s", flush=True)
            next_report = chars + step
    if not sentences:
        raise DataError(f"{', '.join(s.path for s in sources)}: no text to train on "
                        f"(every document is shorter than --min_chars={cfg.min_chars})")
    return sentences


def train_model(sentences: list[str], cfg: Config) -> bytes:
    """SentencePiece BPE on `sentences` -> the serialized tokenizer.model; a vocabulary the text cannot fill and
    other trainer failures are one-line DataErrors. The trainer runs in a thread of its own (it releases the GIL)
    while this one waits, so Ctrl-C is answered at once, not when the training ends (minutes on a large budget)."""
    result: dict = {}

    def work():
        try:
            result["model"] = train_bpe(sentences, cfg)
        except BaseException as e:  # handed to the waiting thread, which raises it
            result["error"] = e

    worker = threading.Thread(target=work, name="sentencepiece-trainer", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.1)  # a short wait: Python runs the Ctrl-C handler between two
    if "error" in result:
        raise result["error"]
    return result["model"]


def train_bpe(sentences: list[str], cfg: Config) -> bytes:
    """train_model's work, in its thread."""
    import sentencepiece as spm

    out = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=out, model_type="bpe", vocab_size=cfg.vocab_size,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,  # pad = unk (id 0), as ChatGLM2
            byte_fallback=True, split_digits=True, character_coverage=cfg.character_coverage,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            # the space piece always exists: without it a space falls back to the bytes of "▁" (U+2581), which decode
            # to "▁", not to a space (a corpus without spaces, e.g. pure Chinese, would break the round trip)
            required_chars="\u2581", max_sentence_length=4 * cfg.max_sentence_chars + 16,
            input_sentence_size=0, num_threads=cfg.num_threads or os.cpu_count() or 1,
            minloglevel=0 if cfg.verbose else 2)
    except RuntimeError as e:
        reason = first_line(e)
        if "required_chars" in reason:  # "... 2000 vs 2309": the characters to cover need more pieces than allowed
            need = reason.rsplit(" vs ", 1)[-1].split(".")[0]
            raise DataError(f"--vocab_size={cfg.vocab_size} is too small for the {need} characters and specials that "
                            f"--character_coverage={cfg.character_coverage} keeps: raise --vocab_size or lower "
                            "--character_coverage") from None
        if "Vocabulary size" in reason:
            raise DataError(f"--vocab_size={cfg.vocab_size} is too large for this text ({reason.split('] ', 1)[-1]}); "
                            "give more text (--inputs, --max_chars) or a smaller --vocab_size") from None
        raise DataError(f"SentencePiece training failed: {reason}") from None
    return out.getvalue()


def write_outputs(out: OutputFolder, model: bytes, meta: dict) -> list:
    """tokenizer_meta.json and tokenizer.model into the new folder, then the swap -> their final paths."""
    write_json(out.path(META_FILE), meta)
    write_atomic(out.path(MODEL_FILE), model)
    return out.commit([META_FILE, MODEL_FILE])


def run(cfg: Config) -> dict:
    """Reads, trains, checks and writes; returns the sidecar's content."""
    sources = [detect(p, f, cfg) for p, f in parse_inputs(cfg.inputs, cfg.manifest, "pretrain")]
    print(f"train_tokenizer: {len(sources)} inputs -> {cfg.out_dir} | BPE, vocab {cfg.vocab_size:,}, "
          f"budget {cfg.max_chars:,} characters")
    for s in sources:
        print(f"  {s.path}: {s.container} of {s.fmt}")
    rep, stats = Reporter(cfg.max_reports), {s.path: Counter() for s in sources}
    # the folder is claimed before the text is read: a refused or busy folder costs nothing
    out = OutputFolder(cfg.out_dir, "tokenizer", [s.path for s in sources], cfg.overwrite, script="train_tokenizer.py",
                       replace_own=False)
    try:
        meta, paths, train_s, chars, sample = train_and_describe(sources, cfg, rep, stats, out)
    except OSError as e:  # a full disk: the old tokenizer stays
        out.abort()
        raise DataError(f"{e.filename or cfg.out_dir}: {e.strerror or e}; {cfg.out_dir} is unchanged") from None
    except BaseException:
        out.abort()
        raise
    print(f"train_tokenizer: {meta['vocab_size']:,} pieces in {train_s:.1f}s ({chars:,} characters read in "
          f"{meta['seconds']['read']:.1f}s); {meta['bytes_per_token_on_training_sample']} bytes per token on the first "
          f"{sample:,} sentences; sha256 {meta['tokenizer_sha256'][:12]}... -> {', '.join(paths)}")
    return meta


def train_and_describe(sources: list, cfg: Config, rep: Reporter, stats: dict, out: OutputFolder) -> tuple:
    """run()'s work once the folder is claimed -> (meta, written paths, training seconds, characters, sample size)."""
    import sentencepiece as spm

    t0 = time.perf_counter()
    sentences = read_sentences(sources, cfg, rep, stats)
    chars = sum(c["chars"] for c in stats.values())
    print(f"training on {chars:,} characters ({len(sentences):,} sentences) ...", flush=True)
    t1 = time.perf_counter()
    model = train_model(sentences, cfg)
    train_s = time.perf_counter() - t1
    sp = spm.SentencePieceProcessor(model_proto=model)
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.vocab_size()) == (0, 1, 2, cfg.vocab_size), "trainer settings"
    sample = sentences[: 1000]  # how much text a token holds on the training text (a first look, not held out)
    n_tokens = sum(len(ids) for ids in sp.encode(sample))
    n_bytes = sum(len(s.encode("utf-8")) for s in sample)
    settings = {k: v for k, v in config_dict(cfg).items() if k not in ("inputs", "manifest", "out_dir", "progress", "verbose")}
    meta = {"format": TOKENIZER_FORMAT, "tokenizer_sha256": hashlib.sha256(model).hexdigest(),
            "vocab_size": sp.vocab_size(), "model_type": "bpe", "special_ids": SPECIAL_IDS,
            "byte_fallback": True, "split_digits": True, "normalization": "identity", "add_dummy_prefix": False,
            "remove_extra_whitespaces": False, "settings": settings,
            "sources": [{"path": s.path, "format": s.fmt, **dict(stats[s.path])} for s in sources],
            "characters": chars, "sentences": len(sentences), "bad_records": dict(rep.counts),
            "bytes_per_token_on_training_sample": round(n_bytes / max(n_tokens, 1), 4),
            "seconds": {"read": round(t1 - t0, 3), "train": round(train_s, 3)}}
    paths = write_outputs(out, model, meta)
    return meta, paths, train_s, chars, len(sample)


def main(argv: Optional[list[str]] = None) -> dict:
    cfg = config_or_exit(Config, argv)
    with user_errors():
        return run(cfg)


if __name__ == "__main__":
    with ctrl_c():  # one line, exit 130: the output folder's unfinished copy is already removed
        main()
