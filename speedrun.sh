#!/usr/bin/env bash
# The whole pipeline in one command on one GPU: tokenize -> pretrain -> SFT -> eval -> report card. On one GPU the
# last four run in one Python process (chain.py: torch and CUDA start once); each prints the
# command that runs it alone.
#
#   bash speedrun.sh --corpora=DIR              # one GPU; DIR holds pretrain/, sft/ and eval/ (README: "Get the data")
#   NPROC=8 bash speedrun.sh --corpora=DIR      # torchrun on 8 GPUs of one node (the same global batch in tokens)
#   bash speedrun.sh --tiny                     # a tiny model on the embedded sample (data/sample/): a CPU check in minutes
#
# DIR/pretrain/*: corpora in any format data_process.py reads; DIR/sft/*: instruction data; DIR/eval/*.jsonl: held-out
# {"question", "answer"} lines (the first file is used). Writes data under --data (default data/speedrun), runs under
# --out (default out): out/pretrain, out/sft, and the report card out/report.md with report.json and curves.png
# beside it. Other flags: --overwrite (replace the data and runs of an earlier speedrun in the same folders; without it
# a speedrun stops at once where earlier output is; a running speedrun's folders are locked), --skip_setup (use the
# current Python as it is), --eval_original (also score the original project's sampling protocol into
# out/eval_original, for comparison),
# --sft_mix=SPEC (sft.py --mix: default medical-finetune=3, i.e. the conversations of sft/ files whose name contains
# "medical-finetune" (doctors' answers) three times per epoch, when such a file is there; --sft_mix= for none),
# --tokenizer_vocab=N (train a tokenizer of our own with N pieces on DIR/pretrain first, train_tokenizer.py, and use it
# in every stage; default 8192, --tiny 0; 0 = the ChatGLM2 tokenizer; docs/recipe.md compares them), --eval_args="FLAGS" (added to the
# main eval stage, e.g. --eval_args="--candidates=8 --temperature=0.7 --top_p=0.9" to score another decoding),
# --pretrain_args="FLAGS" and --sft_args="FLAGS" (the same for pretrain.py and sft.py, e.g. --pretrain_args="--epochs=2";
# not the flags that wire the stages together: --data_dir, --out_dir, --init_from, --ckpt, --data, --tokenizer, ...).
# Otherwise each stage keeps its own defaults (pretrain.py, sft.py, eval.py), so what it measures is what a user
# gets from the plain commands it prints, except fewer validation passes and checkpoint saves.
# torch.compile's caches (graphs, kernels) go to $TORCHINDUCTOR_CACHE_DIR, default ~/.cache/babyllama/torch_compile
# ($XDG_CACHE_HOME if set): a second speedrun reuses them instead of compiling again (docs/speed.md).
# Paths may hold spaces (each stage gets every path as one argument); --corpora and its file names may not hold a
# comma (the stages take comma-separated file lists), and no path a line break.
set -euo pipefail
cd "$(dirname "$0")"
# every stage's command is an array (each path one word, whatever it holds): empty ones need bash 4.4
(( BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 404 )) || { echo "error: speedrun.sh needs bash 4.4 or newer" >&2; exit 2; }

CORPORA="" ; DATA="" ; OUT="" ; TINY=0 ; SETUP=1 ; OVERWRITE=() ; MIX="medical-finetune=3" ; MIX_SET=0 ; TOK_VOCAB="" ; EVAL_ARGS="" ; EVAL_ORIG=0 ; PRE_ARGS="" ; SFT_ARGS=""
for arg in "$@"; do
  case "$arg" in
    --corpora=*) CORPORA="${arg#*=}" ;;
    --data=*) DATA="${arg#*=}" ;;
    --out=*) OUT="${arg#*=}" ;;
    --tiny) TINY=1 ;;
    --skip_setup) SETUP=0 ;;
    --overwrite) OVERWRITE=(--overwrite) ;;
    --sft_mix=*) MIX="${arg#*=}"; MIX_SET=1 ;;
    --tokenizer_vocab=*) TOK_VOCAB="${arg#*=}" ;;
    --eval_args=*) EVAL_ARGS="${arg#*=}" ;;
    --pretrain_args=*) PRE_ARGS="${arg#*=}" ;;
    --sft_args=*) SFT_ARGS="${arg#*=}" ;;
    --eval_original) EVAL_ORIG=1 ;;
    -h|--help) sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument $arg (see bash speedrun.sh --help)" >&2; exit 2 ;;
  esac
done
# torch.compile's caches in a folder that outlives /tmp, so a second speedrun skips most of the compilation
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/babyllama/torch_compile}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$TORCHINDUCTOR_CACHE_DIR/triton}"
export TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1  # torch 2.13's defaults: said, not assumed
echo "compile cache: $TORCHINDUCTOR_CACHE_DIR"
if [ $TINY = 1 ]; then
  CORPORA="${CORPORA:-data/sample}"; DATA="${DATA:-data/speedrun-tiny}"; OUT="${OUT:-out/speedrun-tiny}"
  # a 4M-parameter model, short runs, a short eval: the pipeline and the report, not a good model; one thread unless
  # set (tiny matrices gain little from two, and two stall each other on shared cores: 4 min instead of 1 at load 4)
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  MODEL=(--dim=64 --n_layers=2 --n_heads=4 --max_seq_len=128 --batch_size=8)
  PRE_X=("${MODEL[@]}" --learning_rate=3e-3 --min_lr=3e-4 --epochs=2 --warmup_steps=10 --eval_interval=20 --eval_windows=32 --log_interval=10)
  SFT_X=(--batch_size=8 --learning_rate=3e-3 --min_lr=3e-4 --epochs=2 --warmup_steps=5 --eval_interval=20 --log_interval=10)
  EVAL_X=(--max_new_tokens=48 --ppl_windows=32 --limit=12 --candidates=2)  # 2 sampled starts, not 4: a check, at half the cost
  ORIG_NEW=48
else
  DATA="${DATA:-data/speedrun}"; OUT="${OUT:-out}"
  # fewer validations and saves than the defaults: each writes best.pt and last.pt (0.9 GB) in the background, and a
  # save due before the previous one is on disk waits for it (SFT's default 50 steps take under a second on an H200);
  # eval.py answers every question in one batch (its default on a GPU); 3 pretraining epochs, not pretrain.py's 6:
  # on this corpus the answers score as well or better after SFT, in half the time (docs/recipe.md)
  PRE_X=(--eval_interval=1000 --ckpt_interval=1000 --epochs=3); SFT_X=(--eval_interval=200 --ckpt_interval=200)
  EVAL_X=()
  ORIG_NEW=100
fi
# our own 8K tokenizer by default: measured better and faster than ChatGLM2's at this size (docs/recipe.md); the
# tiny run keeps ChatGLM2's (the embedded sample is too small to learn a vocabulary from)
if [ -z "$TOK_VOCAB" ]; then TOK_VOCAB=$([ $TINY = 1 ] && echo 0 || echo 8192); fi
[[ "$TOK_VOCAB" =~ ^[0-9]+$ ]] && { [ "$TOK_VOCAB" = 0 ] || [ "$TOK_VOCAB" -ge 300 -a "$TOK_VOCAB" -le 65535 ]; } || {
  echo "error: --tokenizer_vocab=$TOK_VOCAB: expected 0 (the ChatGLM2 tokenizer) or a vocabulary size in 300..65535" >&2; exit 2; }
[ -n "$CORPORA" ] || { echo "error: give --corpora=DIR (a folder with pretrain/, sft/ and eval/; see README) or --tiny" >&2; exit 2; }
# every check below comes before any work (setup, tokenizing, training): a bad argument costs nothing
die() { echo "error: $*" >&2; exit 2; }
# spaces are fine (every path is passed as one argument), but the stages take comma-separated corpus lists and the
# corpus files are listed one per line: a comma in the corpus paths, or a line break in any path, is refused here
# rather than misread later
NL=$'\n'
case "$CORPORA" in *[,$NL]*) die "--corpora=$CORPORA: a path with a comma or a line break; give one without (e.g. a link to it)" ;; esac
for pair in "--data=$DATA" "--out=$OUT"; do
  case "$pair" in *$NL*) die "${pair%%=*}: a path with a line break; give one without (e.g. a link to it)" ;; esac
done
NPROC="${NPROC:-1}"
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "NPROC=$NPROC: expected the number of GPUs, 1 or more"
for sub in pretrain sft eval; do
  [ -d "$CORPORA/$sub" ] || die "$CORPORA/$sub: no such folder (expected $CORPORA/{pretrain,sft,eval})"
done
odd=$(find "$CORPORA/pretrain" "$CORPORA/sft" "$CORPORA/eval" -maxdepth 1 -type f \( -name '*,*' -o -name "*$NL*" \) \
  | head -n 1)
[ -z "$odd" ] || die "$odd: a file name with a comma or a line break; rename it"
files() { find "$1" -maxdepth 1 -type f ! -name '.*' ! -name '*.md' | sort | paste -sd, -; }
PRE_IN=$(files "$CORPORA/pretrain"); SFT_IN=$(files "$CORPORA/sft")
EVAL_FILE=$(find "$CORPORA/eval" -maxdepth 1 -name '*.jsonl' | sort | head -n 1)
[ -n "$PRE_IN" ] && [ -n "$SFT_IN" ] && [ -n "$EVAL_FILE" ] || die "$CORPORA needs files in pretrain/ and sft/ and a .jsonl in eval/"
# the eval set is read last, after minutes of training: a bad line is said now (file:line), as the eval would say it
python3 -c 'import sys; from babyllama.errors import user_errors; from babyllama.fileio import load_qa
with user_errors(): load_qa(sys.argv[1])' "$EVAL_FILE" || exit 2

# the SFT mix (sft.py --mix), checked here against the sft/ file names, not after pretraining: NAME=TIMES parts
# (TIMES 0-100; spaces around them are dropped), each NAME part of a file name; the first matching part sets a file's
# count, others count once, and a mix must leave something. The default applies only when a file it names is there.
SFT_NAMES=$(find "$CORPORA/sft" -maxdepth 1 -type f ! -name '.*' ! -name '*.md' -exec basename {} \;)
if [ -n "$MIX" ] && [ $MIX_SET = 0 ] && ! grep -qF -- "${MIX%%=*}" <<< "$SFT_NAMES"; then MIX=""; fi
parts=() ; IFS=, read -ra raw <<< "$MIX"
for part in ${raw[@]+"${raw[@]}"}; do
  part=$(echo "$part" | sed 's/^[[:space:]]*//; s/[[:space:]]*$//; s/[[:space:]]*=[[:space:]]*/=/')
  [ -n "$part" ] || continue
  [[ "$part" =~ ^([^=[:space:]]+)=([0-9]+)$ ]] && [ "${BASH_REMATCH[2]}" -le 100 ] ||
    die "--sft_mix=$MIX: '$part' is not NAME=TIMES (TIMES a whole number 0-100, NAME without spaces), e.g. medical=3"
  grep -qF -- "${BASH_REMATCH[1]}" <<< "$SFT_NAMES" ||
    die "--sft_mix=$MIX: '${BASH_REMATCH[1]}' is in no file name of $CORPORA/sft ($(paste -sd, - <<< "$SFT_NAMES"))"
  parts+=("$part")
done
MIX=$(IFS=,; echo "${parts[*]:-}")
if [ -n "$MIX" ]; then
  left=0
  while read -r name; do
    times=1
    for part in "${parts[@]}"; do [[ "$name" == *"${part%=*}"* ]] && { times=${part##*=}; break; }; done
    left=$(( left + times ))
  done <<< "$SFT_NAMES"
  [ "$left" -gt 0 ] || die "--sft_mix=$MIX: leaves no conversation (every file of $CORPORA/sft counted 0 times)"
fi
MIX_X=(); [ -n "$MIX" ] && MIX_X=("--mix=$MIX")
# the speedrun wires the stages together (where each reads and writes, which tokenizer): --*_args may not move that
wired() {  # wired NAME "FLAGS" FLAG...: one of FLAG in the --NAME_args is refused
  local name=$1 word flag words=(); read -ra words <<< "$2"; shift 2
  for word in ${words[@]+"${words[@]}"}; do
    for flag in "$@"; do
      [[ "$word" == "$flag" || "$word" == "$flag="* ]] && die "--${name}_args: $flag is set by the speedrun (it" \
        "wires the stages together); choose the folders with --out, --data and --corpora, the tokenizer with --tokenizer_vocab"
    done
  done
  return 0
}
wired pretrain "$PRE_ARGS" --data_dir --out_dir --tokenizer
wired sft "$SFT_ARGS" --init_from --data_dir --out_dir --tokenizer
wired eval "$EVAL_ARGS" --ckpt --data --val_bin --answer_pool --tokenizer --out_dir
echo "SFT mix: ${MIX:-none (every conversation once per epoch)}"

# the folders are this speedrun's alone: one lock over all its stages (flock on the folders themselves, held by this
# shell until it exits, inherited by its stages), taken before anything is written; without --overwrite an earlier
# run's output (or anything at the names a speedrun writes) is left alone
mkdir -p -- "$DATA" "$OUT" 2>/dev/null || die "--data=$DATA / --out=$OUT: cannot create these folders"
exec 8<"$DATA" 9<"$OUT"
python3 -m babyllama.folder_lock 8 "$DATA" speedrun.sh || exit 2
[ "$DATA" -ef "$OUT" ] || python3 -m babyllama.folder_lock 9 "$OUT" speedrun.sh || exit 2
if [ ${#OVERWRITE[@]} = 0 ]; then
  held=() ; writes=("$OUT"/{speedrun.jsonl,pretrain,sft,eval_original,report.md,report.json,curves.png} "$DATA"/{pretrain,sft})
  [ "$TOK_VOCAB" = 0 ] || writes+=("$DATA/tokenizer")
  for path in "${writes[@]}"; do
    if [ -e "$path" ] || [ -L "$path" ]; then held+=("$path"); fi
  done
  [ ${#held[@]} = 0 ] || die "${held[*]:0:3}: output of an earlier run where this speedrun writes; --overwrite" \
    "replaces it, or pick another --out/--data"
fi

[ $SETUP = 1 ] && source ./setup.sh
# Python's bytecode: where torch's has no .pyc that Python can reuse or write (a read-only install, or
# PYTHONDONTWRITEBYTECODE, as in some container images), every stage and every compile worker compiles torch's modules
# from source again, seconds each (docs/speed.md); the speedrun then keeps the bytecode in its own cache folder
WARM_TORCH=0
if [ -z "${PYTHONPYCACHEPREFIX:-}" ] && ! python -m babyllama.pycache torch; then
  export PYTHONPYCACHEPREFIX="${XDG_CACHE_HOME:-$HOME/.cache}/babyllama/pycache"
  unset PYTHONDONTWRITEBYTECODE
  WARM_TORCH=1
  echo "bytecode cache: $PYTHONPYCACHEPREFIX (torch's own bytecode cannot be reused here)"
fi
if [ "$NPROC" -gt 1 ]; then LAUNCH=(torchrun --standalone "--nproc_per_node=$NPROC"); else LAUNCH=(python); fi
LOG="$OUT/speedrun.jsonl"; rm -f -- "$LOG"  # a new log (a link there is removed, not followed)
T0=$(date +%s)
# in the background while the first stages use a core or two: matplotlib's font list (a fresh machine builds it at its
# first plot, seconds at the end of pretraining) and, where the bytecode is kept here, the modules of the packages the
# stages import compiled at once on every core (instead of one by one as each is first imported: a cold start of
# chain.py's imports took twice as long on 2 cores, docs/speed.md)
(python -c "import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot" >/dev/null 2>&1 &)
[ $WARM_TORCH = 0 ] || (python -m babyllama.pycache --compile torch triton sympy networkx mpmath numpy jinja2 nltk \
  jieba sacrebleu sentencepiece tqdm matplotlib >/dev/null 2>&1 &)

# quoted WORD...: the words as one command line a shell reads back as the same words (as Python's shlex.join): a
# word of these characters as it is, any other in single quotes; what the console, speedrun.jsonl and the card show
quoted() {
  local word line=""
  for word in "$@"; do
    case "$word" in
      ""|*[!ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_@%+=:,./-]*) word="'${word//\'/\'\"\'\"\'}'" ;;
    esac
    line+="${line:+ }$word"
  done
  printf '%s' "$line"
}

# stage NAME COMMAND...: runs it, prints it first, appends {"stage","command","seconds"} to speedrun.jsonl
stage() {
  local name=$1; shift
  # the chain (one GPU; several: its --check) checks every stage's flags as it starts: a flag it refused ended it,
  # and ends the speedrun here, before the next data stage, not after the training
  if [ -n "${CHAIN_PID:-}" ] && ! kill -0 "$CHAIN_PID" 2>/dev/null; then
    wait "$CHAIN_PID" || exit $?
    [ "$NPROC" -gt 1 ] || exit 1  # the chain of one GPU ends only after the data stages
    CHAIN_PID=""
  fi
  local cmd; cmd=$(quoted "$@")
  echo; echo "== [$(( $(date +%s) - T0 ))s] $name: $cmd"
  local t=$(date +%s.%N)
  "$@"
  python - "$LOG" "$name" "$t" "$cmd" <<'PY'
import json, sys, time
log, name, start, cmd = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
from babyllama.fileio import open_append  # never through a link
with open_append(log) as f:
    f.write(json.dumps({"stage": name, "command": cmd, "seconds": round(time.time() - start, 1)}, ensure_ascii=False) + "\n")
PY
}

TOK_X=()  # every stage reads the same tokenizer: ChatGLM2's as the scripts find it, or the one trained here
[ "$TOK_VOCAB" = 0 ] || TOK_X=(--tokenizer="$DATA/tokenizer")
read -ra EVAL_USER <<< "$EVAL_ARGS"  # --eval_args: flags separated by spaces (not expanded as file patterns)
read -ra PRE_USER <<< "$PRE_ARGS"
read -ra SFT_USER <<< "$SFT_ARGS"
PRE_CMD=(pretrain.py --data_dir="$DATA/pretrain" --out_dir="$OUT/pretrain" "${TOK_X[@]}" "${PRE_X[@]}" "${PRE_USER[@]}"
  "${OVERWRITE[@]}")
SFT_CMD=(sft.py --init_from="$OUT/pretrain" --data_dir="$DATA/sft" --out_dir="$OUT/sft" "${TOK_X[@]}" "${MIX_X[@]}"
  "${SFT_X[@]}" "${SFT_USER[@]}" "${OVERWRITE[@]}")
EVAL_CMD=(eval.py --ckpt="$OUT/sft" --data="$EVAL_FILE" --val_bin="$DATA/pretrain" --baselines
  --answer_pool="$DATA/sft/train.jsonl" "${TOK_X[@]}" "${EVAL_X[@]}" "${EVAL_USER[@]}")
# the original project's protocol: sampling at temperature 1.0 from the top 100 tokens, at most 100 new tokens
ORIG_CMD=()
if [ $EVAL_ORIG = 1 ]; then
  ORIG_CMD=(eval.py --ckpt="$OUT/sft" --data="$EVAL_FILE" --val_bin=none --beams=1 --temperature=1.0 --top_k=100
    --no_repeat_ngram=0 --max_new_tokens=$ORIG_NEW --out_dir="$OUT/eval_original" "${TOK_X[@]}" "${EVAL_X[@]}")
else  # an earlier speedrun's (--overwrite) is not this run's: the card must not show it (a link there goes, not its files)
  if [ -L "$OUT/eval_original" ]; then rm -f -- "$OUT/eval_original"
  else rm -f -- "$OUT/eval_original/eval_report.json" "$OUT/eval_original/eval_report.md"; fi
fi
if [ "$NPROC" = 1 ]; then
  # one process for pretraining, SFT, eval and the card: they share torch's import, CUDA and the compiled graphs, so
  # SFT's compilation can reuse pretraining's (chain.py; each stage is the command it prints, run as its script's
  # main). It starts now and imports torch and starts CUDA while the data stages below run, then waits for READY
  READY="$OUT/.data-ready"; rm -f -- "$READY"
  CHAIN=(python chain.py "--record=$LOG" "--after=$READY" "${PRE_CMD[@]}" -- "${SFT_CMD[@]}" -- "${EVAL_CMD[@]}")
  [ ${#ORIG_CMD[@]} = 0 ] || CHAIN+=(-- --name=eval-original "${ORIG_CMD[@]}")
  CHAIN+=(-- report.py --run="$OUT")
  echo; echo "== [$(( $(date +%s) - T0 ))s] pretrain, sft, eval and report in one process, started now, its stages once the data is ready: $(quoted "${CHAIN[@]}")"
  "${CHAIN[@]}" &
  CHAIN_PID=$!
  # READY is written whole (renamed into place, never through a link): the chain never reads it half-written. If a
  # data stage fails (or Ctrl-C), READY says stop and the chain exits without running a stage
  ready() { rm -f -- "$READY.tmp"; echo "$1" > "$READY.tmp" && mv -f -- "$READY.tmp" "$READY"; }
  trap '[ -e "$READY" ] || ready stop' EXIT
else  # torchrun runs each stage on its own: their flags are checked now, beside the data stages
  CHECK=(python chain.py --check "${PRE_CMD[@]}" -- "${SFT_CMD[@]}" -- "${EVAL_CMD[@]}")
  [ ${#ORIG_CMD[@]} = 0 ] || CHECK+=(-- "${ORIG_CMD[@]}")
  "${CHECK[@]}" &
  CHAIN_PID=$!
fi

if [ "$TOK_VOCAB" != 0 ]; then
  # on 5M characters drawn from every file in turn: 6 s instead of 20 s for 8K pieces on an H200 host's CPU, for 5%
  # more tokens on the corpora than a vocabulary learnt from all 19M (docs/speed.md)
  stage tokenizer python train_tokenizer.py --inputs="$PRE_IN" --vocab_size="$TOK_VOCAB" --max_chars=5000000 \
    --out_dir="$DATA/tokenizer" "${OVERWRITE[@]}"
fi
stage tokenize-pretrain python data_process.py pretrain --inputs="$PRE_IN" --out_dir="$DATA/pretrain" "${TOK_X[@]}" \
  "${OVERWRITE[@]}"
stage tokenize-sft python data_process.py sft --inputs="$SFT_IN" --out_dir="$DATA/sft" "${TOK_X[@]}" "${OVERWRITE[@]}"
if [ "$NPROC" = 1 ]; then
  ready ok
  wait "$CHAIN_PID"  # its status is the speedrun's (set -e)
  rm -f -- "$READY"
else
  [ -z "$CHAIN_PID" ] || wait "$CHAIN_PID"  # the flags checked before any GPU trains (set -e: a bad one ends here)
  CHAIN_PID=""
  stage pretrain "${LAUNCH[@]}" "${PRE_CMD[@]}"
  stage sft "${LAUNCH[@]}" "${SFT_CMD[@]}"
  stage eval python "${EVAL_CMD[@]}"
  [ ${#ORIG_CMD[@]} = 0 ] || stage eval-original python "${ORIG_CMD[@]}"
  stage report python report.py --run="$OUT"
fi
echo; echo "== speedrun done in $(( $(date +%s) - T0 ))s: $OUT/report.md"
# the model's tokenizer is found from its checkpoint: no --tokenizer needed
echo "talk to the model: $(quoted python chat.py --ckpt="$OUT/sft"); use it elsewhere: $(quoted python export.py \
--ckpt="$OUT/sft" --out_dir="$OUT/hf") (docs/export.md)"
