"""The plumbing of baby-llama2-chinese: what the scripts at the repository root share but a learner need not read first.

It never imports the root (model.py, trainer.py, ...): the root imports it.
  errors      the error classes, check(), user_errors(): one line and exit 2 for input a user can fix
  config      the one config mechanism: typed dataclass + --flags / --config file, --help, validation
  runtime     device, precision, DDP, autocast, random state
  checkpoint  what a checkpoint holds, its checksum, the writer and reader, the diverged-weights guard
  run_dir     a run folder's lock, fresh start or resume, Ctrl-C
  train_log   log.txt, metrics.jsonl, summary.json, the loss curve, throughput and ETA
  fileio      atomic, no-follow file writes; JSON-lines reading
  output_dir  output folders (data_process.py, export.py, train_tokenizer.py): built aside, swapped in whole
  folder_lock one writer per folder (flock), for run folders, output folders and speedrun.sh
  children    child processes (pool workers, external tools) that die with their parent
  corpora     reading every corpus format data_process.py accepts, and deduplication
  hub         downloads from the Hugging Face Hub, export.py's upload
  fused_ce    the output layer + cross-entropy without the (tokens, vocab) logits
  bleu        BLEU-4 (the original protocol) and sacreBLEU
  quality     degenerate answers, lengths, the retrieval and fixed-answer baselines
"""
