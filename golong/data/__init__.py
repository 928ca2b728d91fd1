"""Data: GoLongRL/verl records, chat-templated prompts, the prompt sampler, sequence packing.

    records = load_records("train.parquet")                 # validated golong.data.Record list
    prompts = build_prompts(records, tokenizer, 163_840)    # chat template + left truncation
    sampler = PromptSampler(len(prompts), seed=0)           # resumable: state_dict / load_state_dict
    batches = pack([p.input_ids for p in prompts[:8]], token_budget=32_768)

Synthetic data of the nine tasks: golong.data.synthetic (write_dataset); a demo tokenizer:
golong.data.tokenizer (build_demo_tokenizer).
"""

from golong.data.packing import PackedBatch, pack
from golong.data.prompts import EncodedPrompt, PromptSampler, build_prompts
from golong.data.records import GroundTruth, Record, RecordError, iter_records, load_records, write_records

__all__ = [
    "EncodedPrompt",
    "GroundTruth",
    "PackedBatch",
    "PromptSampler",
    "Record",
    "RecordError",
    "build_prompts",
    "iter_records",
    "load_records",
    "pack",
    "write_records",
]
