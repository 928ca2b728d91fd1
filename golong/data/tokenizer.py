"""A small byte-level BPE tokenizer with a Qwen3-style chat template, trained offline in < 1 s.

For the CPU demo and tests (no download). Like Qwen's: byte-level (every string round-trips),
digits split one by one, `<|im_start|>` / `<|im_end|>` chat markers, `<|endoftext|>` padding,
`<think>` / `</think>` as added (non-special) tokens that survive `skip_special_tokens=True`.
Training text defaults to synthetic records of the nine tasks, so their words are single tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

PAD = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_TOKENS = ("<think>", "</think>")
SPECIAL_TOKENS = (PAD, IM_START, IM_END)

# Qwen3's template reduced to plain chat: system/user/assistant turns, generation header, and the
# enable_thinking=False switch that pre-fills an empty think block.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)


def _default_texts() -> list[str]:
    from golong.data.synthetic import generate, reference_response

    recs = generate(90, 200, seed=12345)
    return [r.prompt[0]["content"] + "\n" + reference_response(r) for r in recs]


def build_demo_tokenizer(vocab_size: int = 2048, texts: Iterable[str] | None = None):  # noqa: ANN201
    """Train the demo tokenizer and wrap it as a transformers.PreTrainedTokenizerFast.

    Deterministic for given (vocab_size, texts). `vocab_size` counts the special and think tokens.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(THINK_TOKENS), special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts) if texts is not None else _default_texts(), trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=PAD,
                                   chat_template=CHAT_TEMPLATE, model_max_length=1 << 30)
