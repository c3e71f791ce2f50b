"""Small real models in Hugging Face format, built offline: for the demo, the tests and the benchmarks.

A base model is a randomly initialised `transformers` model (Llama- or GPT-2-style) with a word-level
tokenizer; a fine-tune is the base plus seeded deltas, written as safetensors (optionally sharded)
or as a PyTorch `.bin`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

WORDS = (
    "the a an and or of to in on for with is are was were be been it this that these those i you he she we they "
    "model merge weights layer token hello world good bad yes no one two three four five red green blue cat dog"
).split()


def build_tokenizer(directory: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    words = specials + WORDS
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words[:vocab_size])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(directory)


def _config(family: str, layers: int, hidden: int, vocab: int, tie: bool) -> object:
    from transformers import GPT2Config

    if family == "llama" or family in LLAMA_LIKE:
        return _llama_like_config(family, layers, hidden, vocab, tie)
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab,
            n_embd=hidden,
            n_layer=layers,
            n_head=4,
            n_positions=128,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
            tie_word_embeddings=True,
        )
    raise ValueError(f"unknown family {family!r}")


# Dense families with Llama-style (gate/up/down) MLPs, the inputs of the MoE builder.
LLAMA_LIKE = ("mistral", "qwen2", "qwen3", "granite")


def _llama_like_config(family: str, layers: int, hidden: int, vocab: int, tie: bool) -> object:
    import transformers

    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "granite": transformers.GraniteConfig,
    }[family]
    extra: dict[str, object] = {}
    if family == "qwen3":
        extra["head_dim"] = hidden // 4
    if family == "granite":  # non-trivial multipliers, so a converter that drops them is caught
        extra.update(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.3, logits_scaling=2.0)
    if family == "mistral":
        extra["sliding_window"] = None
    return cls(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        **extra,
    )


def save_state_dict(directory: Path, state: dict[str, torch.Tensor], fmt: str = "safetensors", shards: int = 1) -> None:
    """Write `state` as model.safetensors, N safetensors shards + index, or pytorch_model.bin."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}  # no shared storage
    if fmt == "bin":
        torch.save(state, directory / "pytorch_model.bin")
        return
    if shards <= 1:
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
        return
    names = list(state)
    per = -(-len(names) // shards)
    weight_map = {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[k * per : (k + 1) * per]}
        save_file(part, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_base(
    directory: str | Path,
    *,
    family: str = "llama",
    layers: int = 4,
    hidden: int = 32,
    vocab: int = 96,
    tie: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    fmt: str = "safetensors",
    shards: int = 1,
) -> Path:
    """A randomly initialised model of `family` (llama, gpt2, mistral, qwen2, qwen3, granite) with a
    tokenizer, saved in Hugging Face format."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    directory = Path(directory)
    config = _config(family, layers, hidden, vocab, tie)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    config.architectures = [type(model).__name__]  # as a saved transformers model has it
    state = model.state_dict()
    if tie or family == "gpt2":
        state.pop("lm_head.weight", None)  # tied: saved once, as the embedding
    directory.mkdir(parents=True, exist_ok=True)
    config.dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(directory)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3).save_pretrained(directory)
    save_state_dict(directory, state, fmt, shards)
    build_tokenizer(directory, vocab)
    return directory


def load_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a model directory (safetensors or .bin, sharded or not)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    state: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        state.update(load_file(f))
    for f in sorted(directory.glob("pytorch_model*.bin")):
        state.update(torch.load(f, weights_only=True))
    return state


def make_finetune(
    base: str | Path,
    directory: str | Path,
    *,
    seed: int,
    scale: float = 0.02,
    fmt: str = "safetensors",
    shards: int = 1,
) -> Path:
    """`base` plus seeded Gaussian deltas on every floating tensor, with the base's config and tokenizer."""
    import shutil

    base, directory = Path(base), Path(directory)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, t in load_state_dict(base).items():
        if t.is_floating_point():
            noise = torch.randn(t.shape, generator=gen, dtype=torch.float32) * scale
            t = (t.float() + noise).to(t.dtype)
        state[name] = t
    directory.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.suffix in (".json", ".jinja", ".model", ".txt") and "index" not in f.name:
            shutil.copyfile(f, directory / f.name)
    save_state_dict(directory, state, fmt, shards)
    return directory


def make_trained_finetune(
    base: str | Path,
    directory: str | Path,
    texts: list[str],
    *,
    steps: int = 40,
    lr: float = 3e-3,
    seed: int = 0,
    shards: int = 1,
) -> Path:
    """`base` fine-tuned for `steps` full-batch Adam steps on next-token prediction of `texts`: a
    fine-tune that has really learned something (seconds on one CPU thread for the demo's sizes)."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, directory = Path(base), Path(directory)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only wait for each other (10x slower on a busy VM)
    try:
        torch.manual_seed(seed)
        tok = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        batch = tok(texts, return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        for _ in range(steps):
            loss = model(**batch, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    directory.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.suffix in (".json", ".jinja", ".model", ".txt") and "index" not in f.name:
            shutil.copyfile(f, directory / f.name)
    save_state_dict(
        directory, {k: v.detach() for k, v in model.state_dict().items() if k in load_state_dict(base)}, shards=shards
    )
    return directory


def make_vocab_variant(
    base: str | Path,
    directory: str | Path,
    *,
    seed: int,
    added: tuple[str, ...] = (),
    eos_token: str | None = None,
    shuffle: bool = False,
    new_words: tuple[str, ...] = (),
    pad_to_multiple_of: int | None = None,
    scale: float = 0.02,
) -> Path:
    """A fine-tune of `base` whose tokenizer differs, the way real fine-tunes' tokenizers do.

    `added` special tokens (ChatML's `<|im_start|>`, Llama-3's `<|eot_id|>`, ...) get new rows at the
    end of the embedding (and lm_head); `shuffle` renumbers the ordinary words (rows move with their
    words); `new_words` replace the last ordinary words of the vocabulary (same ids, new strings); `pad_to_multiple_of` appends random rows past the tokenizer's length; `eos_token` makes
    one of the added tokens the end-of-sequence token in the tokenizer, config.json and
    generation_config.json. Other tensors are the base plus seeded noise.
    """
    from tokenizers import AddedToken, Tokenizer
    from tokenizers import models as tk_models
    from transformers import AutoConfig, GenerationConfig, PreTrainedTokenizerFast

    from mergesmith.sources import arch

    base, directory = Path(base), Path(directory)
    gen = torch.Generator().manual_seed(seed)
    raw = Tokenizer.from_file(str(base / "tokenizer.json"))
    vocab = raw.get_vocab(with_added_tokens=True)  # word -> old id, ids 0..n-1
    n = len(vocab)
    order = list(range(n))  # new id -> old id
    if shuffle:
        order = list(range(4)) + (torch.randperm(n - 4, generator=gen) + 4).tolist()  # specials stay put
    by_old = {i: w for w, i in vocab.items()}
    for k, word in enumerate(new_words):
        by_old[n - len(new_words) + k] = word
    words = {by_old[old]: new for new, old in enumerate(order)}
    tok = Tokenizer(tk_models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = raw.pre_tokenizer
    tok.decoder = raw.decoder
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.add_tokens([AddedToken(t, special=True, normalized=False) for t in added], special_tokens=True)
    if eos_token is not None:
        fast.eos_token = eos_token
    rows = n + len(added)
    if pad_to_multiple_of:
        rows = -(-rows // pad_to_multiple_of) * pad_to_multiple_of
    state = {}
    for name, t in load_state_dict(base).items():
        if t.is_floating_point():
            t = (t.float() + torch.randn(t.shape, generator=gen) * scale).to(t.dtype)
        if arch.is_embedding(name) and t.dim() == 2 and t.shape[0] == n:
            extra = torch.randn(rows - n, t.shape[1], generator=gen) * t.float().std()
            t = torch.cat([t[order], extra.to(t.dtype)])
        state[name] = t
    directory.mkdir(parents=True, exist_ok=True)
    save_state_dict(directory, state)
    fast.save_pretrained(directory)
    eos_id = fast.convert_tokens_to_ids(fast.eos_token)
    config = AutoConfig.from_pretrained(base)
    config.vocab_size = rows
    config.eos_token_id = eos_id
    config.save_pretrained(directory)
    GenerationConfig(bos_token_id=1, eos_token_id=eos_id, pad_token_id=3).save_pretrained(directory)
    return directory
