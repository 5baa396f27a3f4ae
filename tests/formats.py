"""Today's Qwen3 prompt, byte for byte: what every adapter trained so far was trained on.

The non-thinking ChatML of Qwen3 (empty think block opening the assistant turn). Served
prompts of existing adapters depend on it, so it is written out here, not computed.
"""

SYSTEM, QUESTION = "系统", "头疼怎么办？"
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
QWEN3_PROMPT = (
    "<|im_start|>system\n系统<|im_end|>\n"
    "<|im_start|>user\n头疼怎么办？<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n"
)
