"""Tiny, fully local models for tests, benchmarks and demos (no hub needed).

``build_tokenizer`` trains a byte-level BPE with ``tokenizers`` on a small built-in corpus;
``build_policy`` saves a randomly initialised Llama (or a sequence classifier for rewards) with it.
Policies built with the same tokenizer form one tokenizer family and can be mixed.
"""

from __future__ import annotations

from pathlib import Path

_CORPUS = """The quick brown fox jumps over the lazy dog. Paris is the capital of France.
A policy is a distribution over the next token. Mixing policies combines their log probabilities.
Hello world! How are you today? I am fine, thank you. Please answer formally and concisely.
Alignment researchers tune language models with preferences; the reference model keeps them close.
The weather is sunny and warm, friendly people walk in the park with their dogs and cats.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000. Symbols: , . ; : ! ? ' " ( ) [ ] { } - + = * /
Unicode: café naïve résumé 東京 数学 emoji 🙂 👍 — en dash – ellipsis … «quotes».
"""

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(out_dir: str | Path, vocab_size: int = 512, chat_template: bool = True):
    """Train and save a byte-level BPE tokenizer; returns the transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|developer|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=specials[3:],
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_policy(
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    seed: int,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 2,
    kv_heads: int = 1,
    intermediate: int = 128,
    vocab_pad: int = 0,
    init_std: float = 0.2,
    max_positions: int = 1024,
    reward: bool = False,
) -> Path:
    """Save a random Llama causal LM (or ``LlamaForSequenceClassification`` with one label) to ``out_dir``.

    ``vocab_pad`` adds rows to the lm_head beyond the tokenizer (as many checkpoints do); the engine
    must cut them. ``init_std`` makes random policies peaky enough for greedy tests to mean something.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok) + vocab_pad,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        initializer_range=init_std,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        num_labels=1,
    )
    torch.manual_seed(seed)
    model = (LlamaForSequenceClassification if reward else LlamaForCausalLM)(cfg)
    model.eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def build_family(root: str | Path, names: list[str], vocab_size: int = 512, **policy_kwargs) -> dict[str, Path]:
    """A tokenizer plus one random policy per name (seeds 0, 1, ...) under ``root``."""
    root = Path(root)
    tok_dir = root / "tokenizer"
    build_tokenizer(tok_dir, vocab_size=vocab_size)
    return {name: build_policy(root / name, tok_dir, seed=i, **policy_kwargs) for i, name in enumerate(names)}
