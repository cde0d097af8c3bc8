#!/usr/bin/env bash
# Quick start: the whole pipeline on the embedded sample (data/sample/) at a tiny size.
#   bash demo.sh
# Creates .venv (or uses the active virtual environment), installs the requirements, then runs train_tokenizer ->
# data_process -> pretrain -> sft -> eval. Under a minute on 2 idle CPU cores once the packages are installed
# (README.md gives the measured times); a CUDA GPU is used when present. Needs no download beyond the Python packages:
# the tokenizer is one of our own, trained on the sample in a second (ChatGLM2's 64,793 pieces would make the output
# layer most of a tiny model's time). The real-corpus flow is in README.md; this demo writes only to data/demo/ and
# out/demo/, and a second run replaces what the first wrote (--overwrite).
set -euo pipefail
cd "$(dirname "$0")"
source ./setup.sh
start=$(date +%s)
# one thread unless you say otherwise: a tiny model's matrices gain little from a second, and where other processes
# share the cores two threads stall each other (3-4x slower steps at load 5; docs/training.md)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
D=data/demo
O=out/demo
TOK="--tokenizer=$D/tokenizer"  # given to data_process.py only: each later stage takes it from what the one before recorded
TINY="--dim=128 --n_layers=4 --n_heads=4 --max_seq_len=128 --batch_size=16"

echo "== 1/5 train_tokenizer: a 3,000-piece tokenizer of our own on the sample's pretraining text"
python train_tokenizer.py --vocab_size=3000 --out_dir=$D/tokenizer --progress=false --overwrite

echo "== 2/5 data_process: tokenize the sample corpus and normalize the sample instructions"
python data_process.py pretrain $TOK --out_dir=$D/pretrain --progress=false --overwrite
python data_process.py sft $TOK --out_dir=$D/sft --progress=false --overwrite

echo "== 3/5 pretrain a tiny Llama2 ($TINY)"
python pretrain.py --data_dir=$D/pretrain --out_dir=$O/pretrain --overwrite $TINY --max_steps=100 \
    --warmup_steps=10 --learning_rate=3e-3 --min_lr=3e-4 --eval_interval=20 --eval_windows=32 --log_interval=20

echo "== 4/5 sft: fine-tune it on the sample question/answer pairs"
# a low rate and 2 epochs: on 172 conversations more (or faster) fine-tuning memorizes them and the held-out val
# loss rises above the pretrained model's
python sft.py --init_from=$O/pretrain --data_dir=$D/sft --out_dir=$O/sft --overwrite --batch_size=8 \
    --max_steps=16 --warmup_steps=2 --learning_rate=1e-4 --min_lr=3e-5 --eval_interval=4 --log_interval=4

echo "== 5/5 eval: answer the sample's 30 held-out medical questions, BLEU and perplexity"
echo "artifacts: tokenizer $D/tokenizer/ | tokens $D/pretrain/ | conversations $D/sft/ | pretrain run $O/pretrain/"
echo "           sft run $O/sft/ (best.pt, last.pt, log.txt, loss.png) | eval report $O/sft/eval_report.md"
echo "           demo took $(( $(date +%s) - start )) s before eval"
# a run folder: its best.pt (the lowest val loss), else last.pt, as chat.py and export.py take it
python eval.py --ckpt=$O/sft --data=data/sample/eval/medical_qa.jsonl --val_bin=$D/pretrain --max_new_tokens=64 --answer_pool=$D/sft/train.jsonl
echo "demo done in $(( $(date +%s) - start )) s; talk to the model: python chat.py --ckpt=$O/sft"
