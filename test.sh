#!/usr/bin/env bash
# Runs the test suite: `bash test.sh` (extra arguments go to pytest, e.g. `bash test.sh -k model -x`).
# Tests that need the ChatGLM2 tokenizer find it through $BABYLLAMA_TOKENIZER (else chatglm_tokenizer/tokenizer.model).
set -euo pipefail
cd "$(dirname "$0")"
EXTRA_REQUIREMENTS=requirements-dev.txt source ./setup.sh
python -m pytest -q "$@" tests
