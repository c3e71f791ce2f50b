"""Chat templates: `auto`, a built-in name, or a literal Jinja template, written where transformers reads it."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

from mergesmith.errors import MergeError

log = logging.getLogger("mergesmith")

BUILTIN_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{{ message['content'] + eos_token }}{% else %}{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
    ),
    "alpaca": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    "exaone": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ '[|system|]' + message['content'] + "
        "'[|endofturn|]\\n' }}{% elif message['role'] == 'user' %}{{ '[|user|]' + message['content'] + '\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '[|assistant|]' + message['content'] + '[|endofturn|]\\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
    "gemma": (
        "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant'"
        " else 'user' %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
    ),
    "phi3": (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
    ),
    "zephyr": (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    ),
    "vicuna": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + ' ' }}"
        "{% elif message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
        "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + message['content'] + eos_token + ' ' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
}
SAMPLE = [
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "What is a merge?"},
]


def read_template(model_dir: Path) -> str | None:
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg = model_dir / "tokenizer_config.json"
    if cfg.is_file():
        try:
            value = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, str) else None
    return None


def resolve_template(spec: str, model_dirs: list[Path]) -> str | None:
    if spec == "auto":
        found = [t.strip() for d in model_dirs if (t := read_template(d))]
        return Counter(found).most_common(1)[0][0] if found else None
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    if len(spec) < 20 or "{" not in spec:
        raise MergeError(
            f"'{spec}' is neither a built-in template ({', '.join(['auto', *BUILTIN_TEMPLATES])}) nor a Jinja template",
            "chat_template",
        )
    return spec


def apply_chat_template(directory: Path, spec: str, model_dirs: list[Path]) -> str | None:
    """Write the template as chat_template.jinja (read by transformers), drop any older copy, and
    render one conversation with the saved tokenizer; returns that rendering (None: no tokenizer)."""
    template = resolve_template(spec, model_dirs)
    if template is None:
        return None
    if not (directory / "tokenizer_config.json").is_file():
        log.warning("chat_template: no tokenizer is written (--no-copy-tokenizer), so the template is dropped")
        return None
    (directory / "chat_template.jinja").write_text(template, encoding="utf-8")
    cfg = directory / "tokenizer_config.json"
    if cfg.is_file():
        data = json.loads(cfg.read_text(encoding="utf-8"))
        if data.pop("chat_template", None) is not None:
            cfg.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (directory / "chat_template.json").unlink(missing_ok=True)
    return render_check(directory)


def render_check(directory: Path) -> str:
    """Load the written tokenizer as transformers does and render a short conversation with it."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(directory))
        text = tok.apply_chat_template(SAMPLE, tokenize=False, add_generation_prompt=True)
    except Exception as err:
        why = f"{type(err).__name__}: {err}"
        raise MergeError(f"the chat template does not render a conversation ({why})", "chat_template") from None
    if "What is a merge?" not in text:
        raise MergeError("the chat template renders a conversation without its messages", "chat_template")
    return text
