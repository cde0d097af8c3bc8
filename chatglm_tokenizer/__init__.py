"""The SentencePiece tokenizer of baby-llama2-chinese: ChatGLM2's or one of train_tokenizer.py's (see tokenizer.py)."""
from .tokenizer import (MODEL_FILE, TOKENIZER_ENV, ChatGLMTokenizer, TokenBytes, bits_per_byte, find_tokenizer,
                        load_tokenizer, recorded_tokenizer, tokenizer_sha256)

__all__ = ["MODEL_FILE", "TOKENIZER_ENV", "ChatGLMTokenizer", "TokenBytes", "bits_per_byte", "find_tokenizer",
           "load_tokenizer", "recorded_tokenizer", "tokenizer_sha256"]
