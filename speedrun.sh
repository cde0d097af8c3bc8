#!/usr/bin/env bash
# The whole pipeline in one command on one GPU: tokenize -> pretrain -> SFT -> eval -> report card.
#
#   bash speedrun.sh --corpora=DIR              # one GPU; DIR holds pretrain/, sft/ and eval/ (README: "Get the data")
#   NPROC=8 bash speedrun.sh --corpora=DIR      # torchrun on 8 GPUs of one node (the same global batch in tokens)
#   bash speedrun.sh --tiny                     # a tiny model on the embedded sample (data/sample/): a CPU check in minutes
#
# DIR/pretrain/*: corpora in any format data_process.py reads; DIR/sft/*: instruction data; DIR/eval/*.jsonl: held-out
# {"question", "answer"} lines (the first file is used). Writes data under --data (default data/speedrun), runs under
# --out (default out): out/pretrain, out/sft, out/eval_original, and the report card out/report.md with report.json
# and curves.png beside it. Other flags: --overwrite (replace the data and runs of an earlier speedrun in the same
# folders; without it a second run stops where it would replace a finished run), --skip_setup (use the current Python as it is),
# --sft_mix=SPEC (sft.py --mix: default medical-finetune=3, i.e. the conversations of sft/ files whose name contains
# "medical-finetune" (doctors' answers) three times per epoch, when such a file is there; --sft_mix= for none),
# --tokenizer_vocab=N (train a tokenizer of our own with N pieces on DIR/pretrain first, train_tokenizer.py, and use it
# in every stage; default: the ChatGLM2 tokenizer; docs/recipe.md compares them).
# Otherwise each stage keeps its own defaults (pretrain.py, sft.py, eval.py), so what it measures is what a user
# gets from the plain commands it prints.
set -euo pipefail
cd "$(dirname "$0")"

CORPORA="" ; DATA="" ; OUT="" ; TINY=0 ; SETUP=1 ; OVERWRITE="" ; MIX="medical-finetune=3" ; MIX_SET=0 ; TOK_VOCAB=0
for arg in "$@"; do
  case "$arg" in
    --corpora=*) CORPORA="${arg#*=}" ;;
    --data=*) DATA="${arg#*=}" ;;
    --out=*) OUT="${arg#*=}" ;;
    --tiny) TINY=1 ;;
    --skip_setup) SETUP=0 ;;
    --overwrite) OVERWRITE=--overwrite ;;
    --sft_mix=*) MIX="${arg#*=}"; MIX_SET=1 ;;
    --tokenizer_vocab=*) TOK_VOCAB="${arg#*=}" ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument $arg (see bash speedrun.sh --help)" >&2; exit 2 ;;
  esac
done
if [ $TINY = 1 ]; then
  CORPORA="${CORPORA:-data/sample}"; DATA="${DATA:-data/speedrun-tiny}"; OUT="${OUT:-out/speedrun-tiny}"
  # a 4M-parameter model, short runs, a short eval: the pipeline and the report, not a good model; one thread unless
  # set (tiny matrices gain little from two, and two stall each other on shared cores: 4 min instead of 1 at load 4)
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  MODEL="--dim=64 --n_layers=2 --n_heads=4 --max_seq_len=128 --batch_size=8"
  PRE_X="$MODEL --learning_rate=3e-3 --min_lr=3e-4 --epochs=2 --warmup_steps=10 --eval_interval=20 --eval_windows=32 --log_interval=10"
  SFT_X="--batch_size=8 --learning_rate=3e-3 --min_lr=3e-4 --epochs=2 --warmup_steps=5 --eval_interval=20 --log_interval=10"
  EVAL_X="--max_new_tokens=48 --ppl_windows=32 --limit=12"
  ORIG_NEW=48
else
  DATA="${DATA:-data/speedrun}"; OUT="${OUT:-out}"
  PRE_X=""; SFT_X=""; EVAL_X="--batch_size=128"  # 500 questions in four batches of 128 prompts x 8 beams
  ORIG_NEW=100
fi
[[ "$TOK_VOCAB" =~ ^[0-9]+$ ]] && { [ "$TOK_VOCAB" = 0 ] || [ "$TOK_VOCAB" -ge 300 -a "$TOK_VOCAB" -le 65535 ]; } || {
  echo "error: --tokenizer_vocab=$TOK_VOCAB: expected 0 (the ChatGLM2 tokenizer) or a vocabulary size in 300..65535" >&2; exit 2; }
[ -n "$CORPORA" ] || { echo "error: give --corpora=DIR (a folder with pretrain/, sft/ and eval/; see README) or --tiny" >&2; exit 2; }
for sub in pretrain sft eval; do
  [ -d "$CORPORA/$sub" ] || { echo "error: $CORPORA/$sub: no such folder (expected $CORPORA/{pretrain,sft,eval})" >&2; exit 2; }
done
files() { find "$1" -maxdepth 1 -type f ! -name '.*' ! -name '*.md' | sort | paste -sd, -; }
PRE_IN=$(files "$CORPORA/pretrain"); SFT_IN=$(files "$CORPORA/sft")
EVAL_FILE=$(find "$CORPORA/eval" -maxdepth 1 -name '*.jsonl' | sort | head -n 1)
[ -n "$PRE_IN" ] && [ -n "$SFT_IN" ] && [ -n "$EVAL_FILE" ] || {
  echo "error: $CORPORA needs files in pretrain/ and sft/ and a .jsonl in eval/" >&2; exit 2; }

# the SFT mix: by default only when a file it names is there (a mix naming no file is an error in sft.py)
if [ -n "$MIX" ] && [ $MIX_SET = 0 ] && ! ls "$CORPORA/sft" | grep -q "${MIX%%=*}"; then MIX=""; fi
MIX_X=""; [ -n "$MIX" ] && MIX_X="--mix=$MIX"
echo "SFT mix: ${MIX:-none (every conversation once per epoch)}"

[ $SETUP = 1 ] && source ./setup.sh
NPROC="${NPROC:-1}"
if [ "$NPROC" -gt 1 ]; then LAUNCH="torchrun --standalone --nproc_per_node=$NPROC"; else LAUNCH="python"; fi
mkdir -p "$OUT"
LOG="$OUT/speedrun.jsonl"; : > "$LOG"
T0=$(date +%s)

# stage NAME COMMAND...: runs it, prints it first, appends {"stage","command","seconds"} to speedrun.jsonl
stage() {
  local name=$1; shift
  echo; echo "== [$(( $(date +%s) - T0 ))s] $name: $*"
  local t=$(date +%s.%N)
  "$@"
  python - "$LOG" "$name" "$t" "$*" <<'PY'
import json, sys, time
log, name, start, cmd = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
with open(log, "a", encoding="utf-8") as f:
    f.write(json.dumps({"stage": name, "command": cmd, "seconds": round(time.time() - start, 1)}, ensure_ascii=False) + "\n")
PY
}

TOK_X=""  # every stage reads the same tokenizer: ChatGLM2's as the scripts find it, or the one trained here
if [ "$TOK_VOCAB" != 0 ]; then
  stage tokenizer python train_tokenizer.py --inputs="$PRE_IN" --vocab_size="$TOK_VOCAB" --out_dir="$DATA/tokenizer"
  TOK_X="--tokenizer=$DATA/tokenizer"
fi
stage tokenize-pretrain python data_process.py pretrain --inputs="$PRE_IN" --out_dir="$DATA/pretrain" $TOK_X $OVERWRITE
stage tokenize-sft python data_process.py sft --inputs="$SFT_IN" --out_dir="$DATA/sft" $TOK_X $OVERWRITE
stage pretrain $LAUNCH pretrain.py --data_dir="$DATA/pretrain" --out_dir="$OUT/pretrain" $TOK_X $PRE_X $OVERWRITE
stage sft $LAUNCH sft.py --init_from="$OUT/pretrain" --data_dir="$DATA/sft" --out_dir="$OUT/sft" $TOK_X $MIX_X $SFT_X $OVERWRITE
stage eval python eval.py --ckpt="$OUT/sft" --data="$EVAL_FILE" --val_bin="$DATA/pretrain" --baselines \
    --baseline_pool="$DATA/sft/train.jsonl" $TOK_X $EVAL_X
# the original project's protocol: sampling at temperature 1.0 from the top 100 tokens, at most 100 new tokens
stage eval-original python eval.py --ckpt="$OUT/sft" --data="$EVAL_FILE" --val_bin=none --beams=1 --temperature=1.0 --top_k=100 \
    --no_repeat_ngram=0 --max_new_tokens=$ORIG_NEW --out_dir="$OUT/eval_original" $TOK_X $EVAL_X
stage report python report.py --run="$OUT"
echo; echo "== speedrun done in $(( $(date +%s) - T0 ))s: $OUT/report.md"
