"""Data: GoLongRL/verl records, chat-templated prompts, the prompt sampler.

    records = load_records("train.parquet")                 # validated golong.data.Record list
    prompts = build_prompts(records, tokenizer, 163_840)    # chat template + left truncation
    sampler = PromptSampler(len(prompts), seed=0)           # resumable: state_dict / load_state_dict

The records a run reads and `golong data check`: golong.data.check (run_records, check_data).
Synthetic data of the nine tasks: golong.data.synthetic (write_dataset); a demo tokenizer:
golong.data.tokenizer (build_demo_tokenizer). Sequences are packed into micro-batches by
golong.parallel.batching (per data-parallel rank, under trainer.micro_batch_tokens).
"""

from golong.data.prompts import EncodedPrompt, PromptSampler, build_prompts
from golong.data.records import GroundTruth, Record, RecordError, iter_records, load_records, write_records

__all__ = [
    "EncodedPrompt",
    "GroundTruth",
    "PromptSampler",
    "Record",
    "RecordError",
    "build_prompts",
    "iter_records",
    "load_records",
    "write_records",
]
