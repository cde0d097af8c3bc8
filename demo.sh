#!/usr/bin/env bash
# Quick start: the whole pipeline on the embedded sample (data/sample/) at a tiny size.
#   bash demo.sh
# Creates .venv (or uses the active virtual environment), installs the requirements, then runs
# data_process -> pretrain -> sft -> eval. About 4 minutes on 2 CPU cores; a CUDA GPU is used when present.
# Needs the ChatGLM2 tokenizer: downloaded from the Hugging Face Hub on first use, or give it with
# BABYLLAMA_TOKENIZER=/path/to/tokenizer.model bash demo.sh
# The real-corpus flow is in README.md; this demo writes only to data/demo/ and out/demo/.
set -euo pipefail
cd "$(dirname "$0")"
source ./setup.sh
start=$(date +%s)
D=data/demo
O=out/demo
# --overwrite: a rerun of the demo replaces its own earlier output in data/demo and out/demo
TINY="--dim=64 --n_layers=2 --n_heads=4 --max_seq_len=128 --batch_size=8"

echo "== 1/4 data_process: tokenize the sample corpus and normalize the sample instructions"
python data_process.py pretrain --out_dir=$D/pretrain --progress=false --overwrite
python data_process.py sft --out_dir=$D/sft --progress=false --overwrite

echo "== 2/4 pretrain a tiny Llama2 ($TINY)"
python pretrain.py --data_dir=$D/pretrain --out_dir=$O/pretrain --overwrite $TINY --max_steps=100 --warmup_steps=10 \
    --learning_rate=3e-3 --min_lr=3e-4 --eval_interval=50 --eval_windows=32 --log_interval=20

echo "== 3/4 sft: fine-tune it on the sample question/answer pairs"
python sft.py --init_from=$O/pretrain --data_dir=$D/sft --out_dir=$O/sft --overwrite --batch_size=8 --max_steps=80 \
    --warmup_steps=8 --learning_rate=3e-3 --min_lr=3e-4 --eval_interval=40 --log_interval=20

echo "== 4/4 eval: answer the sample medical questions, BLEU and perplexity"
echo "artifacts: tokens $D/pretrain/ | conversations $D/sft/ | pretrain run $O/pretrain/ (best.pt, last.pt, log.txt, loss.png)"
echo "           sft run $O/sft/ | eval report $O/sft/eval_report.md | demo took $(( $(date +%s) - start )) s before eval"
# last.pt: the sample's 10 validation conversations are too few to pick a best step by
python eval.py --ckpt=$O/sft/last.pt --data=data/sample/eval/medical_qa.jsonl --val_bin=$D/pretrain --max_new_tokens=64
