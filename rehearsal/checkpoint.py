"""A checkpoint shaped like the published Qwen3-8B, scaled down to train on 2 CPU cores.

``QWEN3_8B_CONFIG`` is Qwen/Qwen3-8B's ``config.json`` as published on the hub. The
rehearsal keeps every field except the three size fields (hidden/intermediate size, layer
count, and ``max_window_layers`` which follows the layer count): untied embeddings,
bfloat16, head_dim 128 with 32 query / 8 KV heads, rope_theta 1e6, the full 151,936-row
vocabulary. head_dim is explicit in Qwen3, so a small hidden_size keeps the real attention
shapes (q_proj: hidden -> 32 x 128).

The files are laid out like the hub repository: ``config.json``, ``generation_config.json``,
``model-0000X-of-0000N.safetensors`` + ``model.safetensors.index.json``, ``tokenizer.json``
and ``tokenizer_config.json`` with Qwen3's own chat template (``enable_thinking``) inside,
which is *not* the project's template: the pipeline must replace it everywhere.

Run: ``python -m rehearsal.checkpoint OUT_DIR`` (random bf16 weights, seeded).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# Qwen/Qwen3-8B config.json, verbatim.
QWEN3_8B_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 12288,
    "max_position_embeddings": 40960,
    "max_window_layers": 36,
    "model_type": "qwen3",
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

# Qwen/Qwen3-8B generation_config.json, verbatim (sampling defaults for thinking mode).
QWEN3_8B_GENERATION_CONFIG = {
    "bos_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "pad_token_id": 151643,
    "temperature": 0.6,
    "top_k": 20,
    "top_p": 0.95,
    "transformers_version": "4.51.0",
}

# The only fields the rehearsal changes: small enough for a few CPU training steps.
REHEARSAL_SIZE = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2, "max_window_layers": 2}

# Qwen3's chat template as shipped in the hub's tokenizer_config.json. It opens the
# assistant turn *without* the empty think block unless enable_thinking=False is passed:
# model.chat_template_kwargs freezes that into the saved template, so that training and
# serving render the same prompt.
QWEN3_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""


def rehearsal_config(**size: int) -> dict:
    """The published config with only the size fields replaced."""
    unknown = set(size) - set(REHEARSAL_SIZE)
    if unknown:
        raise ValueError(f"only size fields may change, not {sorted(unknown)}")
    return {**QWEN3_8B_CONFIG, **REHEARSAL_SIZE, **size}


def write_tokenizer(out_dir: Path) -> None:
    """Qwen's real vocabulary and special-token ids, with the hub's template in tokenizer_config.json."""
    from mediagent.pipeline.base_model import build_tokenizer

    tok = build_tokenizer()
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    tok.save_pretrained(out_dir)
    # The hub repo keeps the template inside tokenizer_config.json (no chat_template.jinja).
    template = out_dir / "chat_template.jinja"
    if template.exists():
        template.unlink()
    path = out_dir / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["chat_template"] = QWEN3_CHAT_TEMPLATE
    path.write_text(json.dumps(cfg, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def build_checkpoint(out_dir: str | Path, seed: int = 0, max_shard_size: str = "30MB", **size: int) -> Path:
    """Write the scaled-down Qwen3-8B checkpoint (random bf16 weights, several shards) to out_dir."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = rehearsal_config(**size)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**config)).to(torch.bfloat16).eval()
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    # The hub's JSON files byte for byte in shape (transformers would rewrite them in its own).
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out_dir / "generation_config.json").write_text(
        json.dumps(QWEN3_8B_GENERATION_CONFIG, indent=2) + "\n", encoding="utf-8"
    )
    write_tokenizer(out_dir)
    shards = sorted(out_dir.glob("model-*.safetensors"))
    if len(shards) < 2:
        raise RuntimeError(f"expected several shards in {out_dir}, got {len(shards)}: lower max_shard_size")
    return out_dir


if __name__ == "__main__":
    print(build_checkpoint(sys.argv[1]))
