"""Chat templates: `auto`, a built-in name, or a literal Jinja template, written where transformers reads it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from mergesmith.errors import MergeError

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
}


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


def apply_chat_template(directory: Path, spec: str, model_dirs: list[Path]) -> None:
    """Write the template as chat_template.jinja (read by transformers) and drop any older copy."""
    template = resolve_template(spec, model_dirs)
    if template is None:
        return
    (directory / "chat_template.jinja").write_text(template, encoding="utf-8")
    cfg = directory / "tokenizer_config.json"
    if cfg.is_file():
        data = json.loads(cfg.read_text(encoding="utf-8"))
        if data.pop("chat_template", None) is not None:
            cfg.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (directory / "chat_template.json").unlink(missing_ok=True)
