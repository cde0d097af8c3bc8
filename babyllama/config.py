"""One config mechanism for every script.

Each script declares a dataclass of typed defaults, one comment per knob, and calls
`parse_config(Cls)`. Values come, in order of precedence, from:
  1. the dataclass defaults,
  2. a JSON config file given as `--config path.json` (keys are field names),
  3. command-line flags `--key=value` or `--key value` (`--flag` alone sets a bool to True).
`--help` or `-h` anywhere prints the script's docstring and every flag (type, default, the field's comment), exit 0.
Unknown keys, values that do not parse to the field's type, and failed checks in the
dataclass's `validate()` method stop the script with a one-line error before any work starts.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import io
import json
import shlex
import sys
import textwrap
import tokenize
import typing
from typing import Any, Sequence

from babyllama.errors import ConfigError, user_errors


def _parse_value(name: str, text: Any, typ: Any) -> Any:
    """Converts `text` (a str from the command line, or a JSON value) to the field type `typ`."""
    origin = typing.get_origin(typ)
    if origin is typing.Union:  # Optional[X]: "none"/"null" means None, else X
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if text is None or (isinstance(text, str) and text.lower() in ("none", "null", "")):
            return None
        return _parse_value(name, text, args[0])
    if typ is bool:
        if isinstance(text, bool):
            return text
        low = str(text).lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{name}: expected true/false, got {text!r}")
    if typ in (int, float):
        try:
            if typ is int and isinstance(text, str):
                value = float(text)  # accepts 1e6 and 2_000
                if value != int(value):
                    raise ValueError
                return int(value)
            return typ(text)
        except (TypeError, ValueError):
            raise ConfigError(f"--{name}: expected {typ.__name__}, got {text!r}") from None
    if typ is str:
        text, changed = repair_text(str(text))
        if changed:
            print(f"note: --{name}: bytes that are not UTF-8 replaced with \ufffd", file=sys.stderr)
        return text
    if origin in (list, tuple):  # comma-separated on the command line, a list in JSON
        items = text if isinstance(text, (list, tuple)) else [t for t in str(text).split(",") if t]
        (inner,) = set(typing.get_args(typ)) - {Ellipsis} or {str}
        return [_parse_value(name, t, inner) for t in items]
    raise ConfigError(f"--{name}: unsupported field type {typ}")


def repair_text(text: str) -> tuple[str, bool]:
    """Text read with errors="surrogateescape" (command-line flags, a terminal's stdin) -> (valid text, whether
    anything was replaced): bytes that are not UTF-8 become U+FFFD instead of failing later in the tokenizer."""
    try:
        text.encode("utf-8")
        return text, False
    except UnicodeEncodeError:
        # escaped bytes back to bytes (other lone surrogates become "?"), then decoded with U+FFFD for bad ones
        raw = b"".join(ch.encode("utf-8", "surrogateescape") if "\udc80" <= ch <= "\udcff" else
                       ch.encode("utf-8", "replace") for ch in text)
        return raw.decode("utf-8", "replace"), True


def _did_you_mean(name: str, fields, prefix: str) -> str:
    """'; did you mean --X?' for a near miss (a typo, - for _), else the flags to look at (--help lists them all)."""
    close = difflib.get_close_matches(name.replace("-", "_"), list(fields), n=1, cutoff=0.6)
    if close:
        return f"; did you mean {prefix}{close[0]}?"
    return " (--help lists every flag)"


def _split_argv(argv: Sequence[str]) -> list[tuple[str, str | None]]:
    """['--a=1', '--b', '2', '--flag'] -> [('a', '1'), ('b', '2'), ('flag', None)]."""
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: flags look like --key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            else:
                value = None
        pairs.append((key.replace("-", "_"), value))
        i += 1
    return pairs


def parse_config(cls: type, argv: Sequence[str] | None = None):
    """Builds `cls` from defaults, an optional --config JSON file and flags; validates it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    hints = typing.get_type_hints(cls)
    fields = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    pairs = _split_argv(argv)
    for key, value in pairs:
        if key == "config":
            if value is None:
                raise ConfigError("--config needs a path to a JSON file")
            try:
                with open(value, encoding="utf-8") as f:
                    loaded = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise ConfigError(f"--config {value}: {e}") from None
            if not isinstance(loaded, dict):
                raise ConfigError(f"--config {value}: expected a JSON object of settings")
            for k, v in loaded.items():
                if k not in fields:
                    raise ConfigError(f"{value}: unknown key {k!r}{_did_you_mean(k, fields, '')}")
                values[k] = _parse_value(k, v, fields[k])
    for key, value in pairs:
        if key == "config":
            continue
        if key not in fields:
            raise ConfigError(f"unknown flag --{key}{_did_you_mean(key, fields, '--')}")
        if value is None and fields[key] is not bool:
            raise ConfigError(f"--{key} needs a value")
        values[key] = True if value is None else _parse_value(key, value, fields[key])
    cfg = cls(**values)
    object.__setattr__(cfg, "_explicit", frozenset(values))  # what the user set (a resumed run checks these)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def _field_comments(cls: type) -> dict[str, str]:
    """{field: the `# comment` after it in the class source}, for `cls` alone (not its bases); {} without source."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source file (e.g. a class built at run time)
        return {}
    comments = {}  # line number -> trailing comment text
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments.setdefault(tok.start[0], tok.string.lstrip("#").strip())
    out = {}
    for node in ast.parse(source).body[0].body:  # the class's own statements
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            # a field spanning several lines keeps its comment on any of them: take the first
            found = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
            out[node.target.id] = found[0] if found else ""
    return out


def _show_default(f: dataclasses.Field) -> str:
    """A field's default as it would be typed on the command line (shell-quoted)."""
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (list, tuple)):
        text = ",".join(map(str, value))
    else:
        text = "none" if value is None else str(value)
    return shlex.quote(text)


def help_text(cls: type) -> str:
    """The script's docstring (the module that defines `cls`), then one line per field of `cls`:
    `--name=default  type  meaning`, the meaning being the field's source comment; a subclass field without a
    comment takes the comment of the field it overrides, so the text cannot drift from the code."""
    meanings: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # base classes first: a subclass's own comment wins
        if dataclasses.is_dataclass(klass):
            meanings.update({k: v for k, v in _field_comments(klass).items() if v or k not in meanings})
    def type_name(t) -> str:  # the annotation as written (a string under `from __future__ import annotations`)
        return t if isinstance(t, str) else t.__name__ if isinstance(t, type) else str(t).replace("typing.", "")
    rows = [(f"--{f.name}={_show_default(f)}", type_name(f.type), meanings.get(f.name, ""))
            for f in dataclasses.fields(cls)]
    w_flag = min(max(len(r[0]) for r in rows), 40)
    w_type = max(len(r[1]) for r in rows)
    doc = (getattr(sys.modules.get(cls.__module__), "__doc__", None) or "").strip()
    lines = [doc, ""] if doc else []
    lines += ["Flags (--key=value or --key value; a bool flag alone means true; -h/--help prints this text).",
              "--config file.json sets any of them from a JSON object; flags on the command line win.", ""]
    lines += [f"  {flag:<{w_flag}}  {typ:<{w_type}}  {meaning}".rstrip() for flag, typ, meaning in rows]
    return "\n".join(lines)


def config_or_exit(cls: type, argv: Sequence[str] | None = None):
    """parse_config for a script's main(): --help / -h prints help_text and exits 0; a bad config prints one line and
    exits with status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(help_text(cls))
        raise SystemExit(0)
    with user_errors():
        return parse_config(cls, argv)


def config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
