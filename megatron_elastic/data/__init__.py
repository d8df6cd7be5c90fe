"""Data: tokenizers, Megatron indexed and GPT datasets, generated token streams and reasoning
text."""

from megatron_elastic.data.gpt_data import (
    MegatronTokenizerAdapter,
    build_gpt_datasets,
    check_blend,
    micro_batches,
)
from megatron_elastic.data.indexed import calibration_batches, check_prefix, write_indexed_dataset
from megatron_elastic.data.prepare import encode_documents, prepare_dataset
from megatron_elastic.data.reasoning import (
    ReasoningRecord,
    extract_answer,
    generate_records,
    render_prompt,
    render_text,
    score_answer,
)
from megatron_elastic.data.synthetic import MarkovTokenSource
from megatron_elastic.data.tokenizers import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    train_bpe_tokenizer,
)

__all__ = [
    "HFTokenizer",
    "MarkovTokenSource",
    "MegatronTokenizerAdapter",
    "ReasoningRecord",
    "SentencePieceTokenizer",
    "Tokenizer",
    "build_gpt_datasets",
    "calibration_batches",
    "check_prefix",
    "check_blend",
    "encode_documents",
    "extract_answer",
    "generate_records",
    "load_tokenizer",
    "micro_batches",
    "prepare_dataset",
    "render_prompt",
    "render_text",
    "score_answer",
    "train_bpe_tokenizer",
    "write_indexed_dataset",
]
