"""MediAgent-Engine: a DVC pipeline that LoRA-fine-tunes Qwen3 on cMedQA2 and serves it with vLLM.

``pipeline/`` holds the DVC stages, ``commands/`` what a person runs, the modules here what
both share. ``mediagent --help`` lists everything.
"""
