"""The ChatGLM2 SentencePiece tokenizer, as baby-llama2-chinese uses it (see tokenizer.py)."""
from .tokenizer import TOKENIZER_ENV, ChatGLMTokenizer, find_tokenizer, load_tokenizer, tokenizer_sha256

__all__ = ["TOKENIZER_ENV", "ChatGLMTokenizer", "find_tokenizer", "load_tokenizer", "tokenizer_sha256"]
